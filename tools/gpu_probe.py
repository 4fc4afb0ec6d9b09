"""Time the dense solvers the subspace methods are built on, on the GPU, for the shapes of the TSV-M GPU target
(8 ViT-B/32-shaped task vectors: r = 768), so the choice between solver paths rests on measurements of the
machine at hand: batched torch.linalg.eigh (whichever cuSOLVER routine this torch picks for a batch), eigvalsh,
SVD, and fp32 / fp64 / TF32 GEMMs of the same sizes. Prints one line per case (median of 5 after a warm-up).

    python tools/gpu_probe.py
"""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe: needs a CUDA device")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    g = torch.Generator(device=dev).manual_seed(0)
    for batch, n in ((1, 768), (96, 768), (96, 128), (1, 1024)):
        for dt in (torch.float32, torch.float64):
            a = torch.randn(batch, 2 * n, n, device=dev, dtype=dt, generator=g)
            gram = a.mT @ a
            t_eigh = timed(lambda gram=gram: torch.linalg.eigh(gram), reps=2)
            t_vals = timed(lambda gram=gram: torch.linalg.eigvalsh(gram), reps=2)
            # the official loop's SVDs (8 at most: cuSOLVER runs them one after the other)
            t_svd = timed(lambda a=a: torch.linalg.svd(a[:8], full_matrices=False), reps=1) * batch / min(batch, 8)
            t_gram = timed(lambda a=a: a.mT @ a)
            flops = 2 * batch * 2 * n * n * n
            print(f"batch {batch:3d} n {n:4d} {str(dt)[6:]:8s}: eigh {t_eigh * 1e3:9.2f} ms "
                  f"({t_eigh / batch * 1e3:7.3f} per matrix), eigvalsh {t_vals * 1e3:9.2f} ms, "
                  f"svd of (2n x n) {t_svd * 1e3:9.2f} ms (scaled from <= 8), gram {t_gram * 1e3:7.3f} ms "
                  f"({flops / t_gram / 1e12:6.1f} TFLOP/s)")
    torch.backends.cuda.matmul.allow_tf32 = True
    a = torch.randn(96, 1536, 768, device=dev, generator=g)
    t = timed(lambda: a.mT @ a)
    print(f"tf32 gram, batch 96 of 1536 x 768: {t * 1e3:.3f} ms ({2 * 96 * 1536 * 768 * 768 / t / 1e12:.1f} TFLOP/s)")


if __name__ == "__main__":
    main()
