"""PNG plot of the training-throughput sweep (ours vs HF). matplotlib when installed, else a Pillow line chart.

matplotlib is not a dependency of the project; Pillow comes with the venv (transformers' image stack) and is
enough for two lines on a grid. Neither present: no plot, and the reason is returned.
"""
from __future__ import annotations

import os
from typing import Dict, List

SERIES = (("ours", "cpm2-finetune (DeepSpeed)", (31, 119, 180)), ("peer", "HF T5 + AdamW", (255, 127, 14)))


def plot_sweep(sweep: Dict[str, object], out_dir: str, machine: Dict[str, object]) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "plot_train_throughput.png")
    points = sweep["points"]
    title = (f"Training step throughput vs batch size (enc {sweep['enc_len']}, dec {sweep['dec_len']}, fp32)\n"
             f"{machine.get('cpu')}, {machine.get('torch_threads')} threads, {machine.get('date')}")
    xs = [p["batch"] for p in points]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [_pillow_plot(path, xs, points, title)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, color in SERIES:
        ax.plot(xs, [p[key] for p in points], marker="o", label=label, color=[c / 255 for c in color])
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s (encoder + decoder)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _pillow_plot(path: str, xs: List[int], points: List[dict], title: str) -> str:
    import math

    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 480, 80, 30, 60, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    ymax = max(max(p["ours"], p["peer"]) for p in points) * 1.15
    lx = [math.log2(x) for x in xs]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def to_px(x: float, y: float):
        px = left + (math.log2(x) - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - y / ymax * (height - top - bottom)
        return px, py

    for i in range(6):  # horizontal grid with y labels
        y = ymax * i / 5
        _, py = to_px(xs[0], y)
        draw.line([(left, py), (width - right, py)], fill=(225, 225, 225))
        draw.text((8, py - 6), f"{y:,.0f}", fill="black")
    for x in xs:
        px, _ = to_px(x, 0)
        draw.line([(px, top), (px, height - bottom)], fill=(235, 235, 235))
        draw.text((px - 6, height - bottom + 8), str(x), fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for n, (key, label, color) in enumerate(SERIES):
        pts = [to_px(p["batch"], p[key]) for p in points]
        draw.line(pts, fill=color, width=3)
        for px, py in pts:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.line([(left + 15, top + 15 + 18 * n), (left + 45, top + 15 + 18 * n)], fill=color, width=3)
        draw.text((left + 52, top + 9 + 18 * n), label, fill="black")
    for i, line in enumerate(title.split("\n")):
        draw.text((left, 10 + 16 * i), line, fill="black")
    draw.text((width // 2 - 30, height - 25), "batch size", fill="black")
    draw.text((8, top - 18), "tokens/s", fill="black")
    img.save(path)
    return path
