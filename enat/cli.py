"""``enat-sample``: generate ENAT samples, measure images/s, compare with the reference path.

    enat-sample                       # CPU demo: small random-weight model, 16 samples
    enat-sample --compare             # + the torch reference path on the same weights and seeds
    enat-sample --checkpoint nnet_ema.pth --vq-checkpoint vqgan_jax_strongaug.ckpt -n 50 --device cuda
    torchrun --nproc_per_node=8 -m enat.cli --checkpoint nnet_ema.pth -n 50000 --resume --out in256

Without --checkpoint the weights are random (said plainly): the tokens are noise and
the run measures speed.  Without --vq-checkpoint there are no images: tokens are saved
as .npy with a preview PNG labelled as token maps.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

from . import backends as _backends
from .checkpoint import CheckpointError, infer_config, load_checkpoint, read_state_dict
from .configs import DEFAULT_CONFIG, NAMED, get_config, sampling_settings
from .distributed import SliceError, init_from_env, sample_many, saved_slices, stale_temporaries
from .model import ENAT
from .sampler import CUDAGraphSampler, sample


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="enat-sample",
        description="Sample class-conditional token maps with ENAT (fused enat_kernels path), report images/s.",
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"configuration name, e.g. enat-l-256 or e22d2-c1024h16-l256 (default {DEFAULT_CONFIG}, or read from --checkpoint); "
        f"documented: {', '.join(NAMED)}",
    )
    p.add_argument("--checkpoint", default=None, help="ENAT weights (e.g. nnet_ema.pth); random weights without it")
    p.add_argument(
        "--heads", type=int, default=None, help="head count when the configuration is read from --checkpoint (default width / 64)"
    )
    p.add_argument("-n", "--num-samples", type=int, default=16, help="samples to generate (default 16)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="samples per batch, and per resumable slice (default 8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (published: 8)")
    p.add_argument(
        "--cfg-scale",
        "--cfg",
        dest="cfg_scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (published: 2.5 at 256 px, 3.5 at 512 px); --cfg is an alias",
    )
    p.add_argument("--mask-temp", type=float, default=None, help="masking temperature (published: 1.5)")
    p.add_argument("--samp-temp", type=float, default=None, help="sampling temperature (published: 6 at 256 px, 4 at 512 px)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i's noise depends only on (seed, i) (default 0)")
    p.add_argument(
        "--class", dest="klass", type=int, default=None, help="one class for every sample (default: sample i gets class i mod K)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto",) + tuple(_backends.BACKENDS),
        help="enat_kernels backend of the fused path (default auto: cpu on CPUs, triton/cuda on GPUs)",
    )
    p.add_argument("--compare", action="store_true", help="also time the reference (torch) path on the same weights and seeds")
    p.add_argument("--out", default="enat_samples", help="output folder (default enat_samples)")
    p.add_argument("--resume", action="store_true", help="keep slices already saved in OUT/slices and compute only the rest")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete slices an earlier run saved in OUT/slices (without it, or --resume, such a run is refused)",
    )
    p.add_argument("--vq-checkpoint", default=None, help="MaskGIT VQGAN checkpoint (vqgan_jax_strongaug.ckpt) to decode images")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--cuda-graph", action="store_true", help="capture each sampling step in a CUDA graph (GPU only)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: all cores, or 1 when other processes already keep every core busy)",
    )
    p.add_argument("--profile", action="store_true", help="print where sampling time goes (torch.profiler), per category")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class Progress:
    """A one-line progress bar on stderr (rank 0 only)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.seconds, self.enabled = total, 0, 0.0, enabled and total > 0
        self.start = time.perf_counter()
        self.draw()

    def update(self, n: int, seconds: float) -> None:
        self.done += n
        self.seconds += seconds
        self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        rate = f"{self.done / self.seconds:6.2f} img/s" if self.seconds > 0 else "  warming up"
        sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} samples {rate}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _say(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def _build_model(args, device, dtype):
    """The model and a sentence on where its weights come from."""
    state = None
    if args.checkpoint:
        state = read_state_dict(args.checkpoint)
    if args.config is None and state is not None:
        config = infer_config(state, heads=args.heads)
    else:
        config = get_config(args.config or DEFAULT_CONFIG)
    model = ENAT(config)
    if state is not None:
        load_checkpoint(model, args.checkpoint)
        origin = f"weights from {args.checkpoint}"
    else:
        model.reset_parameters(torch.Generator().manual_seed(args.seed))
        origin = "RANDOM weights (no --checkpoint): the tokens are noise; this run measures speed"
    return model.to(device=device, dtype=dtype).eval(), origin


def _fused_backend(args, device) -> str:
    return _backends.fused_backend_for(device) if args.backend == "auto" else args.backend


def _describe_fused(model, device, dtype) -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        desc = model.resolved_backends(device, dtype).describe()
    return desc, [str(w.message) for w in caught]


class SliceRunner:
    """Computes each slice on the fused path (optionally CUDA-graphed) and, with compare,
    on the reference path too, alternating which goes first so that neither gets the
    warmer caches or the quieter moment systematically; keeps the timings."""

    def __init__(self, model, settings, fused: str, compare: bool, cuda_graph: bool, device):
        self.model, self.settings, self.fused, self.compare, self.device = model, settings, fused, compare, device
        self.graphs: dict[int, CUDAGraphSampler] | None = {} if cuda_graph else None
        self.stats = {"fused_n": 0, "fused_s": 0.0, "ref_n": 0, "ref_s": 0.0, "same": 0, "tokens": 0}
        self.last_seconds, self.calls = 0.0, 0

    def _run(self, backend, labels, seeds):
        st = self.settings
        t0 = time.perf_counter()
        if backend == self.fused and self.graphs is not None:
            B = labels.shape[0]
            if B not in self.graphs:  # captured once per batch size (the capture is not timed)
                self.graphs[B] = CUDAGraphSampler(
                    self.model, B, st["steps"], st["cfg_scale"], mask_temp=st["mask_temp"], samp_temp=st["samp_temp"], backend=backend
                )
                t0 = time.perf_counter()
            out = self.graphs[B](labels, seeds)
        else:
            gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
            out = sample(
                self.model,
                labels,
                st["steps"],
                st["cfg_scale"],
                mask_temp=st["mask_temp"],
                samp_temp=st["samp_temp"],
                generator=gens,
                backend=backend,
            )
        tokens = out.cpu()  # waits for the device
        return tokens, time.perf_counter() - t0

    def _warm_up(self, batch: int) -> None:
        """Outside the timings, each path: lazy initialization and the first (largest: every
        token masked) allocations at the batch size; two steps are enough.  Done at the first
        slice computed, so a run that computes nothing (or is refused) samples nothing."""
        warm = torch.arange(batch) % self.model.config.num_classes
        for be in [self.fused] + (["torch"] if self.compare else []):
            sample(self.model, warm, steps=2, generator=torch.Generator(device=self.device).manual_seed(0), backend=be)

    def __call__(self, labels, seeds):
        if self.calls == 0:
            self._warm_up(labels.shape[0])
        order = [self.fused, "torch"] if self.compare else [self.fused]
        if self.calls % 2:
            order.reverse()
        self.calls += 1
        done = {be: self._run(be, labels, seeds) for be in order}
        tokens, self.last_seconds = done[self.fused]
        n = labels.shape[0]
        self.stats["fused_n"] += n
        self.stats["fused_s"] += self.last_seconds
        if self.compare:
            ref, seconds = done["torch"]
            self.stats["ref_n"] += n
            self.stats["ref_s"] += seconds
            self.stats["same"] += int((ref == tokens).sum())
            self.stats["tokens"] += ref.numel()
        return tokens


# torch.set_num_threads with a huge count crashes inside OpenMP (a segfault at 100000);
# 1024 is above the hardware threads of any one machine torch runs on today.
MAX_THREADS = 1024


def _threads_error(requested: int | None) -> str | None:
    if requested is not None and not 1 <= requested <= MAX_THREADS:
        return f"--threads must lie in [1, {MAX_THREADS}], got {requested}"
    return None


def _cpu_threads(requested: int | None) -> tuple[int, str]:
    """Threads for CPU sampling, and why.  OpenMP threads that wait for each other at
    every op collapse when the cores are already busy (measured: 2 threads 5x slower
    than 1 on 2 cores at load 7), so a busy machine gets one thread.
    Raises ValueError for a count outside [1, MAX_THREADS]."""
    error = _threads_error(requested)
    if error is not None:
        raise ValueError(error)
    if requested:
        return requested, ""
    cores, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= cores:
        return 1, f" (load average {load:.1f} on {cores} cores: 1 thread; --threads to override)"
    return torch.get_num_threads(), ""


def main(argv: list[str] | None = None) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _main(_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def _argument_error(args) -> str | None:
    """What is wrong with the numeric and path arguments (those not tied to the model), or None."""
    at_least = [
        ("-n/--num-samples", args.num_samples, 1),
        ("-b/--batch-size", args.batch_size, 1),
        ("--steps", args.steps, 1),
        ("--heads", args.heads, 1),
    ]
    for name, value, low in at_least:
        if value is not None and value < low:
            return f"{name} must be at least {low}, got {value}"
    if (err := _threads_error(args.threads)) is not None:
        return err
    for name, value in (("--cfg-scale", args.cfg_scale), ("--mask-temp", args.mask_temp), ("--samp-temp", args.samp_temp)):
        if value is not None and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
    for name, value in (("--mask-temp", args.mask_temp), ("--samp-temp", args.samp_temp)):
        if value is not None and value < 0:
            return f"{name} must be non-negative, got {value}"
    if args.klass is not None and args.klass < 0:
        return f"--class must be non-negative, got {args.klass}"
    if not args.out:
        return "--out must name a folder, got ''"
    if args.vq_checkpoint is not None and not os.path.isfile(args.vq_checkpoint):
        return f"--vq-checkpoint must name a checkpoint file, but {args.vq_checkpoint!r} is not a file"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out must be a folder, but {args.out} is a file"
    if args.resume and args.overwrite:
        return "--resume keeps earlier slices and --overwrite deletes them: give one"
    return None


def _device(name: str | None) -> torch.device | str:
    """The torch device `name` names, or what is wrong with it."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return f"--device must name a torch device such as cpu or cuda, got {name!r}"
    if device.type not in ("cpu", "cuda"):
        return f"--device must be cpu or cuda, got {name!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name} needs a GPU, but torch sees none"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s)"
    return device


class _Refused(Exception):
    """An argument or input that stops the run before any work: `enat-sample: <message>`, exit status 2."""


def _main(args) -> int:
    try:
        return _run(args)
    except _Refused as e:
        print(f"enat-sample: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    """Check, set up, sample every slice, report and save; _Refused before any sampling work."""
    slices_dir, old = _checked_output(args)
    device, dtype, why_threads, distributed, rank, world = _placement(args)
    model, origin, settings, fused = _prepared_model(args, device, dtype)
    _announce(args, model, origin, settings, fused, device, dtype, why_threads, rank, world)
    decoder = _checked_decoder(args, model.config, device, rank)

    if rank == 0 and (args.overwrite or args.resume):
        for f in (old if args.overwrite else []) + stale_temporaries(slices_dir):
            os.remove(f)
    if distributed:
        torch.distributed.barrier()
    result, runner = _sample_slices(args, model, settings, fused, device, slices_dir, rank, world)

    if distributed:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, runner.stats)
    else:
        everyone = [runner.stats]
    if rank == 0:
        _report(everyone, fused, args, world)
        _save_outputs(args, model.config, result, decoder)
        if args.profile:
            _profile(model, fused, args, settings, device)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _checked_output(args) -> tuple[str, list[str]]:
    """The slices folder and the slices an earlier run left there; _Refused when the
    arguments, or that folder without --resume / --overwrite, forbid the run."""
    error = _argument_error(args)
    if error is not None:
        raise _Refused(error)
    slices_dir = os.path.join(args.out, "slices")
    old = saved_slices(slices_dir)
    folders = [p for p in old if not os.path.isfile(p)]
    if folders:  # never deleted, never read: not something this program wrote
        raise _Refused(f"{folders[0]} is a folder (or other non-file), not a slice; move it away or use another output folder")
    if old and not (args.resume or args.overwrite):
        raise _Refused(f"{slices_dir} holds {len(old)} slices of an earlier run; pass --resume to keep them or --overwrite to delete them")
    return slices_dir, old


def _placement(args):
    """(device, dtype, why the thread count, distributed, rank, world); sets the CPU
    threads and joins the process group torchrun describes."""
    device = _device(args.device)
    if isinstance(device, str):
        raise _Refused(device)
    why_threads = ""
    if device.type == "cpu":
        n_threads, why_threads = _cpu_threads(args.threads)
        torch.set_num_threads(n_threads)
    if args.cuda_graph and device.type != "cuda":
        raise _Refused("--cuda-graph needs --device cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    distributed = init_from_env(device.type)
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, dtype, why_threads, distributed, rank, world


def _prepared_model(args, device, dtype):
    """(model on the fused backend, where its weights come from, sampling settings, fused backend name)."""
    try:
        model, origin = _build_model(args, device, dtype)
    except (CheckpointError, ValueError) as e:
        raise _Refused(str(e)) from e
    config = model.config
    if args.klass is not None and args.klass >= config.num_classes:
        raise _Refused(
            f"--class must lie in [0, {config.num_classes - 1}] ({config.name} has {config.num_classes} classes), got {args.klass}"
        )
    pub = sampling_settings(config)
    settings = dict(
        steps=pub.steps if args.steps is None else args.steps,
        cfg_scale=pub.cfg_scale if args.cfg_scale is None else args.cfg_scale,
        mask_temp=pub.mask_temp if args.mask_temp is None else args.mask_temp,
        samp_temp=pub.samp_temp if args.samp_temp is None else args.samp_temp,
    )
    fused = _fused_backend(args, device)
    model.set_backend(fused)
    return model, origin, settings, fused


def _announce(args, model, origin, settings, fused, device, dtype, why_threads, rank, world) -> None:
    """What runs, on what, with which settings (rank 0 prints)."""
    config = model.config
    desc, notes = _describe_fused(model, device, dtype)
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}{why_threads}" if device.type == "cpu" else ""
    _say(rank, f"enat-sample: {config.name} ({config.num_params() / 1e6:.1f}M parameters), {origin}")
    _say(
        rank,
        f"  {device}{threads}, {str(dtype).replace('torch.', '')}, world size {world}; "
        f"{settings['steps']} steps, cfg_scale {settings['cfg_scale']}, mask_temp {settings['mask_temp']}, "
        f"samp_temp {settings['samp_temp']}",
    )
    _say(rank, f"  fused path: backend {desc}" + (", CUDA graphs" if args.cuda_graph else ""))
    for note in notes:
        _say(rank, f"  note: {note}")


def _checked_decoder(args, config, device, rank):
    """The VQGAN decoder (rank 0), loaded before sampling: a checkpoint that is no VQGAN
    would otherwise fail after all the work."""
    try:
        return _load_decoder(args, config, device) if rank == 0 else None
    except (CheckpointError, ValueError, OSError) as e:
        raise _Refused(f"--vq-checkpoint: {e}") from e


def _sample_slices(args, model, settings, fused, device, slices_dir, rank, world):
    """Every slice of this rank, with a progress bar: (sample_many's result, the SliceRunner)."""
    labels = None if args.klass is None else (lambda i: args.klass)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # already reported as notes
        runner = SliceRunner(model, settings, fused, args.compare, args.cuda_graph, device)
        progress = Progress(-(-args.num_samples // world), enabled=rank == 0 and not args.quiet)
        try:
            result = sample_many(
                model,
                args.num_samples,
                slices_dir,
                global_seed=args.seed,
                slice_size=args.batch_size,
                labels=labels,
                backend=fused,
                sample_fn=runner,
                on_slice=lambda done: progress.update(len(done.sample_indices), runner.last_seconds),
                **settings,
            )
        except SliceError as e:  # raised before any slice is computed
            raise _Refused(str(e)) from e
        finally:
            progress.close()
    return result, runner


def _report(everyone, fused, args, world) -> None:
    def rate(n_key, s_key):  # aggregate throughput: every rank works in parallel
        return sum(s[n_key] / s[s_key] for s in everyone if s[s_key] > 0)

    computed = sum(s["fused_n"] for s in everyone)
    if computed == 0:
        print(f"  all {args.num_samples} samples were already saved in {args.out}/slices (--resume): nothing to time")
        return
    f = rate("fused_n", "fused_s")
    label = f"fused ({fused}):"
    print(f"  {label:<19}{f:8.2f} images/s  ({computed} samples{f', {world} processes' if world > 1 else ''})")
    if args.compare:
        r = rate("ref_n", "ref_s")
        same = sum(s["same"] for s in everyone) / max(1, sum(s["tokens"] for s in everyone))
        print(f"  {'reference (torch):':<19}{r:8.2f} images/s  (same weights and seeds; {100 * same:.1f}% identical tokens)")
        print(f"  {'speedup:':<19}{f / r:8.2f}x")


def _load_decoder(args, config, device):
    """The VQGAN decoder of --vq-checkpoint (None without it)."""
    from .vq import load_vq_decoder

    if not args.vq_checkpoint:
        return None
    return load_vq_decoder(args.vq_checkpoint, codebook_size=config.codebook_size, device=device)


def _save_outputs(args, config, result, decoder) -> None:
    from .vq import save_images, save_token_maps

    tokens = torch.as_tensor(result.tokens.astype(np.int64))
    os.makedirs(args.out, exist_ok=True)
    print(f"  tokens: {result.path} ({tokens.shape[0]} x {tokens.shape[1]} x {tokens.shape[2]}, VQ code ids)")
    if decoder is not None:
        paths = []
        for i in range(0, tokens.shape[0], 16):
            images = decoder.decode(tokens[i : i + 16])
            paths += save_images(images, args.out, start=i)
        print(f"  images: {len(paths)} PNGs in {args.out} (decoded with {args.vq_checkpoint})")
    else:
        shown = tokens[:64]
        npy, png = save_token_maps(shown, args.out, codebook_size=config.codebook_size)
        print(f"  preview: {png} -- TOKEN MAPS (one colour per code), NOT images; pass --vq-checkpoint to decode images")


def _profile(model, fused, args, settings, device) -> None:
    from .profiling import format_breakdown, profile_sampling

    labels = torch.arange(min(args.batch_size, args.num_samples)) % model.config.num_classes
    for be in [fused] + (["torch"] if args.compare else []):
        gen = torch.Generator(device=device).manual_seed(0)
        cats = profile_sampling(
            lambda: sample(
                model,
                labels,
                settings["steps"],
                settings["cfg_scale"],
                mask_temp=settings["mask_temp"],
                samp_temp=settings["samp_temp"],
                generator=gen,
                backend=be,
            )
        )
        print(format_breakdown(cats, f"  profile, {be} path, one batch of {labels.shape[0]}"))


if __name__ == "__main__":
    sys.exit(main())
