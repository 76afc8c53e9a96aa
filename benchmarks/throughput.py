"""Images per second of the four heavy stages, ncpipe's fast path and a plain baseline path side by side.

    python benchmarks/throughput.py                     # CPU: small sizes; GPU: CIFAR-sized full batches
    python benchmarks/throughput.py --arch preactresnet18 --n 4096 --batch 256 --width 1

Stages: ST training, PGD-10 adversarial training (AT), PGD-10 attack (eval mode), feature extraction.

* fast path: the whole uint8 split resident on the device, shuffled and batched there (as ncpipe.train
  does), bf16 autocast and channels_last on CUDA (config ``runtime.amp`` / ``runtime.channels_last``; no-ops
  on CPU, where bf16 has no speed-up), optional torch.compile (``--compile``);
* baseline path: the authors' loop as the reference describes it: fp32, a DataLoader with one worker feeding
  normalised float batches from host memory, NCHW.

Both paths run the same ncpipe code for the step itself (``ncpipe.train.train_step``, ``ncpipe.attacks.pgd``),
so the ratio measures the data path and the numeric format only. FLOPs are counted once per stage with
``torch.utils.flop_counter`` and divided by the measured time; on a GPU the achieved fraction of the device's
dense bf16 peak (from a small table of known cards, or ``--peak-tflops``) is printed too. Data are synthetic
uint8 images: throughput does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ncpipe import attacks
from ncpipe.data import to_float
from ncpipe.models import build_model
from ncpipe.specs import TrainSpec
from ncpipe.train import train_step

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16 = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _spec(method: str, steps: int) -> TrainSpec:
    # only the method and its adversary matter to train_step; the rest takes the schema's defaults
    spec: dict = {"data": {"name": "cifar10"}, "arch": "vgg11bn", "width": 1.0, "method": method, "seed": 0,
                  "optim": {}, "checkpoints": [], "runtime": {}}
    if method == "at":
        spec.update(
            adversary={"norm": "linf", "epsilon": 8, "step": 2, "steps": steps}, at_attack_mode="train"
        )
    return TrainSpec.from_dict(spec)


def _stage_fns(
    model: torch.nn.Module,
    amp: torch.dtype | None,
    opt: torch.optim.Optimizer,
    steps: int,
    gen: torch.Generator,
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    def train(method: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            model.train()
            loss = train_step(model, xb, yb, _spec(method, steps), gen, amp)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> None:
        model.eval()
        attacks.pgd(
            model,
            xb,
            yb,
            norm="linf",
            epsilon=8 / 255,
            step=2 / 255,
            steps=steps,
            generator=gen,
            amp_dtype=amp,
        )

    @torch.no_grad()
    def extract(xb: torch.Tensor, yb: torch.Tensor) -> None:
        model.eval()
        with torch.autocast(xb.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            model.forward_features(xb)

    return {
        "ST train": train("st"),
        f"AT train (PGD-{steps})": train("at"),
        f"PGD-{steps} attack": attack,
        "extract": extract,
    }


def _batches_fast(
    x_dev: torch.Tensor, y_dev: torch.Tensor, batch: int, channels_last: bool, gen: torch.Generator
):
    order = torch.randperm(len(x_dev), generator=gen, device=gen.device).to(x_dev.device)
    for idx in order.split(batch):
        xb = to_float(x_dev[idx])
        yield (xb.contiguous(memory_format=torch.channels_last) if channels_last else xb), y_dev[idx]


def _batches_baseline(loader: DataLoader, device: torch.device):
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def _flops_per_image(fn: Callable, xb: torch.Tensor, yb: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(xb, yb)
    return counter.get_total_flops() / len(xb)


def _setup(path: str, args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    """(stage functions, batch iterator factory) of one path, with its own model, optimiser and generator."""
    on_gpu = device.type == "cuda"
    fast = path == "fast"
    amp = torch.bfloat16 if fast and on_gpu else None
    channels_last = fast and on_gpu
    torch.manual_seed(0)  # both paths start from the same weights
    model = build_model(
        args.arch, num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, width=args.width
    ).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if fast and args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    fns = _stage_fns(net, amp, opt, args.steps, gen)
    if fast:
        x_dev, y_dev = x.to(device), y.to(device)
        return fns, lambda: _batches_fast(x_dev, y_dev, args.batch, channels_last, gen)
    loader = DataLoader(
        TensorDataset(to_float(x), y),
        batch_size=args.batch,
        shuffle=True,
        num_workers=1,
        pin_memory=on_gpu,
        persistent_workers=True,
    )
    return fns, lambda: _batches_baseline(loader, device)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.n,))
    paths = {p: _setup(p, args, device, x, y) for p in ("baseline", "fast")}
    rows = []
    for stage in paths["fast"][0]:
        # The two paths of a stage are timed back to back, best of --repeats, so that drifting machine load
        # (other tenants, thermal state) biases neither.
        for path, (fns, batches) in paths.items():
            fn = fns[stage]
            xb, yb = next(iter(batches()))
            flops = _flops_per_image(fn, xb, yb)
            for _ in range(args.warmup):  # warm-up batches (cudnn autotuning, compilation)
                fn(xb, yb)
            best = 0.0
            for _ in range(args.repeats):
                _sync(device)
                t0, seen = time.perf_counter(), 0
                for xb, yb in batches():
                    fn(xb, yb)
                    seen += len(xb)
                _sync(device)
                best = max(best, seen / (time.perf_counter() - t0))
            rows.append({"path": path, "stage": stage, "images_per_s": best, "tflops": flops * best / 1e12})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="preactresnet18", choices=["preactresnet18", "vgg11bn"])
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=None, help="images per epoch (default: 256 on CPU, 10240 on GPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument(
        "--width", type=float, default=None, help="channel width factor (default: 0.25 CPU, 1 GPU)"
    )
    p.add_argument("--steps", type=int, default=10, help="PGD steps (paper: 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per stage and path; the best counts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's model")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak, if not in the built-in table"
    )
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    args.n = args.n or (10240 if gpu else 256)
    args.width = args.width or (1.0 if gpu else 0.25)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# {args.arch} width {args.width}, {args.n} CIFAR-sized images, batch {args.batch}, "
        f"on {device_name}, "
        f"torch {torch.__version__}"
    )
    rows = run(args)
    peak = _peak(torch.device("cuda" if gpu else "cpu"), args.peak_tflops)
    base = {r["stage"]: r for r in rows if r["path"] == "baseline"}
    print(
        f"{'stage':<22}{'baseline img/s':>16}{'fast img/s':>14}{'speed-up':>10}{'fast TFLOP/s':>14}"
        + (f"{'% bf16 peak':>13}" if peak else "")
    )
    for r in rows:
        if r["path"] != "fast":
            continue
        b = base[r["stage"]]
        line = (
            f"{r['stage']:<22}{b['images_per_s']:>16.1f}{r['images_per_s']:>14.1f}"
            f"{r['images_per_s'] / b['images_per_s']:>9.2f}x{r['tflops']:>14.3f}"
        )
        if peak:
            line += f"{100 * r['tflops'] / peak:>12.1f}%"
        print(line)


if __name__ == "__main__":
    main()
