"""The figure of a simulated run (docs/design.md, Admission control): per-instance prefill
load (predicted queue / TTFT SLO) and decode load (step time / TBT SLO) over time, and
rejections below; one column per run, so two admission policies can be put side by side.
matplotlib is an optional extra.
"""
from minicake.sim.metrics import REJECTED_AFTER_PREFILL, SimResult


def plot_load(runs: list[tuple[str, SimResult]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'minicake[plot]'") from None
    fig, axes = plt.subplots(3, len(runs), figsize=(10 * len(runs), 8), sharex="col", sharey="row",
                             height_ratios=[2, 2, 1], squeeze=False)
    for col, (title, result) in enumerate(runs):
        t = [s[0] for s in result.samples]
        for row, side in ((0, "prefill"), (1, "decode")):
            ax = axes[row][col]
            for i in range(len(result.samples[0][row + 1])):
                ax.plot(t, [s[row + 1][i] for s in result.samples], lw=0.8)
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
            ax.set_ylabel(f"{side} load (one line per instance)")
        ax = axes[2][col]
        ax.hist([[r[0] for r in result.rejections if r[1] != REJECTED_AFTER_PREFILL],
                 [r[0] for r in result.rejections if r[1] == REJECTED_AFTER_PREFILL]],
                bins=100, range=(0, t[-1]), stacked=True, label=["at admission", "after prefill"])
        ax.set_ylabel("rejections")
        ax.set_xlabel("time (s)")
        ax.legend(loc="upper right")
        axes[0][col].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
