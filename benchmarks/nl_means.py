"""Non-local means: vitlab against scikit-image (exact and fast modes) and OpenCV, in one run.

Each of scikit-image's sample images (grayscale) gets white Gaussian noise of sigma 10, 20 and 30 out of 255
(clipped to [0, 1], the same draw for every method), and every method denoises it with patch 7 and search window 21
(scikit-image's patch_distance 10). Each method runs with the parameters its documentation recommends:

* vitlab `nl_means`: its default h (0.8 sigma) and noise subtraction;
* scikit-image `denoise_nl_means(fast_mode=False, sigma=s, h=0.6 s)` and `(fast_mode=True, sigma=s, h=0.8 s)`,
  the starting points its docstring gives when sigma is known;
* OpenCV `fastNlMeansDenoising(h=s)` on the 8-bit image (OpenCV documents no rule; h = sigma is the usual one).

PSNR and SSIM are scikit-image's, against the clean image; time is one call's wall clock after a warm-up call, with
torch and OpenCV limited to ``--threads`` threads (scikit-image's NL-means is single-threaded).

    python benchmarks/nl_means.py                  # 4 images x 3 sigmas, 2 threads; about 2 minutes
    python benchmarks/nl_means.py --quick          # one 128 x 128 crop at sigma 20: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from vitlab.classic import add_noise, nl_means

IMAGES = ["camera", "astronaut", "coins", "moon"]
SIGMAS = [10, 20, 30]
PATCH, SEARCH = 7, 21


def load(name: str, crop: int | None) -> np.ndarray:
    from skimage import color, data

    img = getattr(data, name)()
    img = color.rgb2gray(img) if img.ndim == 3 else img.astype(np.float64) / 255
    if crop:
        H, W = img.shape
        img = img[(H - crop) // 2 : (H + crop) // 2, (W - crop) // 2 : (W + crop) // 2]
    return img.astype(np.float32)


def methods(sigma: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    import cv2
    from skimage.restoration import denoise_nl_means

    def opencv(z: np.ndarray) -> np.ndarray:
        u8 = np.round(z * 255).astype(np.uint8)
        out = cv2.fastNlMeansDenoising(u8, None, h=sigma * 255, templateWindowSize=PATCH, searchWindowSize=SEARCH)
        return out / 255

    def skimage(fast: bool, h: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda z: denoise_nl_means(
            z.astype(np.float64), PATCH, SEARCH // 2, h=h * sigma, fast_mode=fast, sigma=sigma
        )

    return {
        "vitlab": lambda z: nl_means(z, sigma, PATCH, SEARCH),
        "skimage exact": skimage(False, 0.6),
        "skimage fast": skimage(True, 0.8),
        "opencv": opencv,
    }


def quality(out: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out = np.clip(out, 0, 1)
    return (
        float(peak_signal_noise_ratio(clean, out, data_range=1.0)),
        float(structural_similarity(clean, out, data_range=1.0)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=IMAGES, help="scikit-image sample image names")
    p.add_argument("--sigmas", nargs="+", type=float, default=SIGMAS, help="noise levels out of 255")
    p.add_argument("--crop", type=int, help="centre crop of this side (default: whole images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="camera, 128 x 128 crop, sigma 20")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()
    if args.quick:
        args.images, args.sigmas, args.crop = ["camera"], [20.0], 128

    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads: {args.threads}")
    print(f"# patch {PATCH}, search {SEARCH}; PSNR dB / SSIM / seconds")
    names = list(methods(0.1))
    print("| image | size | sigma | noisy | " + " | ".join(names) + " |")
    print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    rows = []
    warm = load("camera", 48)
    for image in args.images:
        clean = load(image, args.crop)
        for s255 in args.sigmas:
            sigma = s255 / 255
            noisy = add_noise(clean, sigma, seed=0)
            row = {"image": image, "size": list(clean.shape), "sigma": s255, "noisy_psnr": quality(noisy, clean)[0]}
            cells = []
            for name, fn in methods(sigma).items():
                fn(warm)  # first-call costs (thread pools, caches) are not the method's
                t0 = time.perf_counter()
                out = fn(noisy)
                elapsed = time.perf_counter() - t0
                psnr, ssim = quality(out, clean)
                row[name] = {"psnr": psnr, "ssim": ssim, "time_s": elapsed}
                cells.append(f"{psnr:.2f} / {ssim:.3f} / {elapsed:.2f}")
            rows.append(row)
            size = "x".join(map(str, clean.shape))
            print(f"| {image} | {size} | {s255:g} | {row['noisy_psnr']:.2f} | " + " | ".join(cells) + " |", flush=True)

    beaten = [r for r in rows if r["vitlab"]["psnr"] < r["skimage exact"]["psnr"]]
    print(f"\nvitlab PSNR >= scikit-image exact on {len(rows) - len(beaten)} of {len(rows)} image/sigma pairs")
    for r in beaten:
        ours, theirs = r["vitlab"]["psnr"], r["skimage exact"]["psnr"]
        print(f"  below on {r['image']} sigma {r['sigma']:g}: {ours:.2f} < {theirs:.2f}")
    big = [r["vitlab"]["time_s"] for r in rows if r["size"] == [512, 512]]
    if big:
        print(f"vitlab on 512 x 512: {min(big):.2f} to {max(big):.2f} s (target < 1 s)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"threads": args.threads, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
