"""Sub-model widths: what a width-r client really costs, against the full-width model, in one process.

For each width r (default 1, 0.5, 0.25, 0.125) the script builds the registered model at
``ModelSize(width=r)`` (default ``resnet_small`` on 3x32x32 inputs, 10 classes; any registered model
with ``--model``, e.g. ``resnet18`` or ``cnn``) and measures:

- ``params``: trainable parameter elements (``fedhet.models.count_params``), and their ratio to width 1;
- ``FLOPs/sample``: forward FLOPs for one example (``fedhet.models.flops_per_sample``: torch's
  ``FlopCounterMode``, a multiply-add is 2 FLOPs; norms, ReLUs and pooling are not counted);
- ``step``: one SGD step (``zero_grad(set_to_none=True)``, forward, cross-entropy, backward,
  ``optimizer.step()``, SGD with momentum 0.9) on a fixed random batch (``--batch``, default 32), in
  training mode. Every model is warmed up (``--warmup`` steps) and then the widths are timed
  round-robin, one step each per round, for ``--repeats`` rounds, so that other load on the machine
  falls on every width alike; the table gives the median wall time and the median CPU time of the
  process (user + system, all threads), with ``torch.set_num_threads(--threads)``;
- ``peak step memory``: the largest amount of memory the step holds at any moment on top of what was
  allocated before it (the parameters, the optimizer's momentum buffers and the input batch are
  allocated before and not counted; the gradients are freed by ``zero_grad(set_to_none=True)`` before
  the measurement, so the peak counts activations saved for backward, gradients, and temporaries).
  On CPU it is read from the allocator events that ``torch.profiler`` records with
  ``profile_memory=True``: each event is one allocation (+bytes) or free (-bytes) of PyTorch's CPU
  allocator, the events are sorted by time and the peak is the maximum of their running sum over one
  profiled step (separate from the timed steps). Memory that is not allocated by PyTorch (e.g. oneDNN
  scratch space, Python objects) is not seen. On CUDA (``--device cuda``) it is
  ``torch.cuda.max_memory_allocated()`` during the step minus ``torch.cuda.memory_allocated()`` before
  it, after ``torch.cuda.reset_peak_memory_stats()``. On CPU the peak includes the scratch buffers
  oneDNN convolutions take from PyTorch's allocator for the duration of one call (2 MB each for
  these models), which is why it does not fall much below a few MB at small widths;
- ``saved activations``: the bytes of the tensors autograd saves for backward in one forward pass
  (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once; the parameters and the
  input batch not counted): the activation memory alone, without scratch space or gradients.

Ratios are to width 1 (or to the first width given). Everything runs in one process with the same
data and the same thread count, so the ratios are like for like. The header line reports ``other
load``: CPU the rest of the machine used while the steps were timed (from ``/proc/stat``), in cores;
step times are only trustworthy when it is near 0.

Usage::

    python benchmarks/bench_submodel_width.py                              # resnet_small, 3x32x32
    python benchmarks/bench_submodel_width.py --model cnn
    python benchmarks/bench_submodel_width.py --model resnet18 --repeats 5 --widths 1,0.5,0.25,0.125,0.0625
    python benchmarks/bench_submodel_width.py --model resnet_small --options '{"norm": "batch", "scaler": true}'
    python benchmarks/bench_submodel_width.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

WIDTHS = (1.0, 0.5, 0.25, 0.125)


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def machine_busy() -> tuple[float, float]:
    """Machine-wide busy and stolen CPU seconds so far (from /proc/stat; zeros where unavailable)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


class Workload:
    """One model at one width, its optimizer, and a fixed batch."""

    def __init__(self, args: argparse.Namespace, width: float, options: dict[str, Any]) -> None:
        import torch

        from fedhet.core.messages import ModelSize
        from fedhet.models import build_model, count_params, flops_per_sample

        self.width = width
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        size = ModelSize(width=width)
        self.model = build_model(
            args.model, input_shape=args.input_shape, num_classes=args.num_classes, size=size, **options
        )
        self.model.to(self.device)
        self.params = count_params(self.model)
        self.flops = flops_per_sample(self.model, args.input_shape)
        gen = torch.Generator().manual_seed(args.seed + 1)
        self.x = torch.randn((args.batch, *args.input_shape), generator=gen).to(self.device)
        self.y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.model.train()
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def step(self) -> None:
        import torch

        self.opt.zero_grad(set_to_none=True)
        self._step_without_zero_grad()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)

    def peak_step_bytes(self) -> int:
        """Peak bytes the step allocates on top of what was live before it (see the module docstring)."""
        import gc

        import torch

        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._step_without_zero_grad()
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - base)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self._step_without_zero_grad()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        return peak

    def saved_activation_bytes(self) -> int:
        """Bytes of the tensors autograd saves for backward in one forward pass (each storage once;
        the parameters and the input batch, allocated before the step, are not counted)."""
        import torch
        import torch.nn.functional as F

        before = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        before.add(self.x.untyped_storage().data_ptr())
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in before:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.model(self.x)
            outs = out if isinstance(out, list) else [out]
            loss = sum(F.cross_entropy(o, self.y) for o in outs)
        del loss, out, outs
        return sum(saved.values())

    def _step_without_zero_grad(self) -> None:
        import torch.nn.functional as F

        out = self.model(self.x)
        if isinstance(out, list):  # a multi-exit model: the sum of every exit's loss
            loss = sum(F.cross_entropy(o, self.y) for o in out)
        else:
            loss = F.cross_entropy(out, self.y)
        loss.backward()
        self.opt.step()


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(args.threads)
    options = json.loads(args.options) if args.options else {}
    loads = [Workload(args, w, options) for w in args.widths]
    for load in loads:
        for _ in range(args.warmup):
            load.step()
    wall, cpu, (busy, steal) = time.perf_counter(), time.process_time(), machine_busy()
    for _ in range(args.repeats):
        for load in loads:
            load.timed_step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    busy1, steal1 = machine_busy()
    # CPU the rest of the machine used while the steps were timed, in cores (0 when unknown)
    other = max(0.0, (busy1 - busy) - cpu) / wall + (steal1 - steal) / wall if busy1 else 0.0
    rows = []
    for load in loads:
        rows.append(
            {
                "model": args.model,
                "width": load.width,
                "params": load.params,
                "flops_per_sample": load.flops,
                "step_s_median": statistics.median(load.wall),
                "step_cpu_s_median": statistics.median(load.cpu),
                "step_s_all": load.wall,
                "other_load_cores": other,
                "peak_step_bytes": load.peak_step_bytes(),
                "saved_activation_bytes": load.saved_activation_bytes(),
            }
        )
    base = rows[0]
    for r in rows:
        r["params_ratio"] = r["params"] / base["params"]
        r["flops_ratio"] = r["flops_per_sample"] / base["flops_per_sample"]
        r["step_ratio"] = r["step_s_median"] / base["step_s_median"]
        r["memory_ratio"] = r["peak_step_bytes"] / base["peak_step_bytes"]
        r["saved_ratio"] = r["saved_activation_bytes"] / base["saved_activation_bytes"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| width | params | params ratio | MFLOPs/sample | FLOPs ratio | step (ms, median) | step CPU (ms) "
        "| step ratio | peak step memory (MB) | memory ratio | saved activations (MB) | saved ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']:g} | {r['params']:,} | {r['params_ratio']:.3f} | {r['flops_per_sample'] / 1e6:.2f} | "
            f"{r['flops_ratio']:.3f} | {r['step_s_median'] * 1e3:.1f} | {r['step_cpu_s_median'] * 1e3:.1f} | "
            f"{r['step_ratio']:.3f} | {r['peak_step_bytes'] / 2**20:.1f} | {r['memory_ratio']:.3f} | "
            f"{r['saved_activation_bytes'] / 2**20:.1f} | {r['saved_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet_small", help="a registered model (default resnet_small)")
    parser.add_argument("--input-shape", type=parse_ints, default=(3, 32, 32), help="C,H,W (default 3,32,32)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--options", help="model options as a JSON object, e.g. '{\"norm\": \"batch\"}'")
    parser.add_argument(
        "--widths", type=parse_floats, default=WIDTHS, help="comma-separated (default 1,0.5,0.25,0.125)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per width first")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per width (round-robin over widths)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args()
    if not args.widths or any(not 0 < w <= 1 for w in args.widths):
        raise SystemExit(f"--widths: each must be in (0, 1], got {args.widths}")
    if args.repeats < 1 or args.batch < 1 or args.threads < 1:
        raise SystemExit("--repeats, --batch and --threads must be >= 1")
    import torch

    rows = measure(args)
    print(
        f"{args.model} on {'x'.join(map(str, args.input_shape))}, batch {args.batch}, {args.threads} threads, "
        f"device {args.device}, torch {torch.__version__}, {args.repeats} timed steps per width; "
        f"other load during the timed steps: {rows[0]['other_load_cores']:.2f} cores"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
