"""The admission latency distributions as an image (matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("api", "Deployment create (dry run) through the API server"),
    ("alone", "AdmissionReview straight to the webhook, 200 requests/s"),
)


def admission_latency(samples: dict[str, list[float]], path: Path) -> None:
    """Per-request latency CDFs, scangate's gate against the no-op webhook, on a log axis:
    one panel through the API server, one of the webhook alone under vegeta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for who, label, color in (("scangate", "scangate", "tab:blue"),
                                  ("noop", "no-op webhook", "tab:gray")):
            values = sorted(samples.get(f"{key}_{who}_ms", []))
            if not values:
                continue
            n = len(values)
            p99 = values[min(n - 1, int(0.99 * n))]
            ax.step(values, [(i + 1) / n for i in range(n)], where="post", color=color,
                    label=f"{label}: p50 {values[n // 2]:.2f} ms, p99 {p99:.2f} ms (n={n})")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency per request (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.axhline(0.99, color="tab:red", linewidth=0.6, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    figure.suptitle("scangate admission latency against a no-op webhook (CDF; dotted: p99)")
    figure.savefig(path, dpi=110)
    plt.close(figure)
