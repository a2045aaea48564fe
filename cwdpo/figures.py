"""The paper's figures (matplotlib, PNG + PDF) from probes.csv / measures.json / scores.json of the runs.

- stage1:      SFT vs SFT-C over Stage-1 steps: training loss, entropy, top-5-beam validation CIDEr-D
               (and SPICE when it can be computed).
- squeeze:     DPO vs CW-DPO over Stage-2 steps: TV and JS to the reference, top-1 mass, ECE, and Δlog p
               of the positives and of each negative kind (gentle, easy, on-policy).
- floor:       the ℓ_floor sweep: final CIDEr-D and TV against ℓ_floor, and the training w_c over steps.
- calibration: reliability diagrams (token level, equal-width bins) of the evaluated models.
- calibrate:   both sides of the control arm's calibration rule (squeezing; task and fluency) against the lr.
- scale:       CW-DPO's gaps (A − B with their 95% intervals, coloured by verdict) against the parameter count
               of each model size (the arms of table T-scale).
Each curve is the mean over seeds with a ±1 std band when there are several seeds. No torch import.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from .data import read_json, write_atomically

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 110, "svg.hashsalt": "cwdpo"})
    return plt


def read_probes(path: str) -> dict:
    """{column: [(step, value)]} of a probes.csv (empty cells skipped)."""
    out: dict = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and v not in ("", "nan"):
                    out.setdefault(k, []).append((step, float(v)))
    return out


def mean_band(curves: list) -> tuple:
    """(steps, mean, std) over seeds of curves [(step, value)], on the steps all seeds share."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*[set(c) for c in curves]))
    vals = np.array([[c[s] for s in steps] for c in curves])
    return steps, vals.mean(0), vals.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))


def _curve_panel(ax, series: dict, column: str, title: str, ylabel: str):
    """One panel: a line (+ band) per series {name: [probes dicts of its seeds]}; says so when empty."""
    drawn = False
    for i, (name, probes) in enumerate(series.items()):
        steps, m, sd = mean_band([p.get(column, []) for p in probes])
        if not steps:
            continue
        c = COLORS[i % len(COLORS)]
        n = sum(1 for p in probes if p.get(column))
        ax.plot(steps, m, color=c, label=f"{name} (n={n})", lw=1.6)
        if n > 1:
            ax.fill_between(steps, m - sd, m + sd, color=c, alpha=0.2, lw=0)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "n/a: not measured in these runs", ha="center", va="center", transform=ax.transAxes,
                fontsize=8, color="gray")
    return drawn


def _save(fig, out_stem: str, layout: bool = True):
    os.makedirs(os.path.dirname(os.path.abspath(out_stem)), exist_ok=True)
    if layout:
        fig.tight_layout()
    for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        write_atomically(f"{out_stem}.{ext}", lambda tmp: fig.savefig(tmp, format=ext, metadata=meta, dpi=150))


def fig_stage1(series: dict, out_stem: str, spice_reason: str | None = None):
    plt = _plt()
    probes = {name: [read_probes(p) for p in paths] for name, paths in series.items()}
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    _curve_panel(axes[0], probes, "train_loss", "Stage-1 training loss", "loss (nats/token)")
    _curve_panel(axes[1], probes, "entropy", "Next-token entropy (probe positives)", "entropy (nats)")
    _curve_panel(axes[2], probes, "val_cider_top5", "Top-5-beam CIDEr-D (validation)", "CIDEr-D (×1)")
    drawn = _curve_panel(axes[3], probes, "val_spice_top5", "Top-5-beam SPICE (validation)", "SPICE")
    if not drawn:
        axes[3].cla()
        axes[3].set_axis_off()
        axes[3].text(0.5, 0.5, "SPICE n/a:\n" + _wrap(spice_reason or "not computed"), ha="center", va="center",
                     fontsize=7, color="gray", transform=axes[3].transAxes)
    fig.suptitle("F-stage1: SFT vs SFT-C over Stage-1 steps", fontsize=11)
    _save(fig, out_stem)
    plt.close(fig)


def fig_squeeze(series: dict, out_stem: str):
    plt = _plt()
    probes = {name: [read_probes(p) for p in paths] for name, paths in series.items()}
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.4))
    panels = [("tv", "TV(π_θ, π_ref)", "total variation"), ("js", "JS(π_θ, π_ref)", "JS divergence (nats)"),
              ("top1", "Top-1 mass (probe positives)", "probability"), ("ece", "Token-level ECE", "ECE"),
              ("dlogp_positive", "Δ log p: positives", "Δ mean token log-prob"),
              ("dlogp_gentle", "Δ log p: gentle negatives", "Δ mean token log-prob"),
              ("dlogp_easy", "Δ log p: easy negatives", "Δ mean token log-prob"),
              ("dlogp_onpolicy", "Δ log p: on-policy negatives", "Δ mean token log-prob")]
    for ax, (col, title, ylabel) in zip(axes.flat, panels):
        _curve_panel(ax, probes, col, title, ylabel)
        if col.startswith("dlogp"):
            ax.axhline(0, color="k", lw=0.6)
    fig.suptitle("F-squeeze: DPO vs CW-DPO over Stage-2 steps (squeezing effect)", fontsize=11)
    _save(fig, out_stem)
    plt.close(fig)


def fig_floor(rows: list, out_stem: str, scale: float = 100.0):
    """rows: [{name, l_floor (resolved number), scores: [paths], measures: [paths], probes: [paths]}]."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    xs, cider, cider_sd, tv, tv_sd, labels = [], [], [], [], [], []
    for r in rows:
        c = [read_json(p)["corpus"]["CIDEr"] * scale for p in r["scores"] if os.path.isfile(p)]
        t = [read_json(p)["test"].get("tv") for p in r["measures"] if os.path.isfile(p)]
        t = [v for v in t if v is not None]
        if r.get("l_floor") is None or not c:
            continue
        xs.append(r["l_floor"])
        labels.append(r["name"])
        cider.append(np.mean(c))
        cider_sd.append(np.std(c, ddof=1) if len(c) > 1 else 0.0)
        tv.append(np.mean(t) if t else math.nan)
        tv_sd.append(np.std(t, ddof=1) if len(t) > 1 else 0.0)
    order = np.argsort(xs) if xs else []
    for ax, ys, sds, title, ylabel in ((axes[0], cider, cider_sd, "Final CIDEr-D vs ℓ_floor", "CIDEr-D (×100)"),
                                       (axes[1], tv, tv_sd, "TV to the reference vs ℓ_floor", "total variation")):
        if xs:
            ax.errorbar([xs[i] for i in order], [ys[i] for i in order], yerr=[sds[i] for i in order], marker="o",
                        capsize=3, color=COLORS[0])
            for i in order:
                ax.annotate(labels[i].replace("ℓ_floor = ", ""), (xs[i], ys[i]), fontsize=7,
                            textcoords="offset points", xytext=(3, 4))
        else:
            ax.text(0.5, 0.5, "n/a: no floor runs", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_xlabel("ℓ_floor (mean token log-prob; 'mean' at its resolved value)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    probes = {r["name"]: [read_probes(p) for p in r["probes"]] for r in rows}
    _curve_panel(axes[2], probes, "train_w_c", "Mean cooling weight w_c during training", "w_c")
    fig.suptitle("F-floor: sensitivity to ℓ_floor", fontsize=11)
    _save(fig, out_stem)
    plt.close(fig)


def fig_calibration(series: dict, out_stem: str):
    """series: {name: [measures.json paths]} — one reliability diagram per name (seeds pooled by bin)."""
    plt = _plt()
    n = max(1, len(series))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), squeeze=False)
    for ax, (i, (name, paths)) in zip(axes[0], enumerate(series.items())):
        docs = [read_json(p)["test"] for p in paths if os.path.isfile(p)]
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=0.8, label="perfect calibration")
        if docs:
            nb = len(docs[0]["reliability"])
            counts = np.zeros(nb)
            conf_sum, acc_sum = np.zeros(nb), np.zeros(nb)
            for d in docs:
                for b, binfo in enumerate(d["reliability"]):
                    if binfo["count"]:
                        counts[b] += binfo["count"]
                        conf_sum[b] += binfo["confidence"] * binfo["count"]
                        acc_sum[b] += binfo["accuracy"] * binfo["count"]
            mids = np.array([(b["lo"] + b["hi"]) / 2 for b in docs[0]["reliability"]])
            width = 1.0 / nb
            has = counts > 0
            ax.bar(mids[has], acc_sum[has] / counts[has], width=width * 0.9, color=COLORS[i % len(COLORS)], alpha=0.75,
                   label="accuracy per bin")
            ax.plot(conf_sum[has] / counts[has], acc_sum[has] / counts[has], "k.", ms=3, label="(mean conf., acc.)")
            eces = [d["ece"] for d in docs]
            spread = f" ± {np.std(eces, ddof=1):.3f}" if len(eces) > 1 else ""
            ax.set_title(f"{name}: ECE {np.mean(eces):.3f}{spread}")
        else:
            ax.set_title(f"{name}: n/a")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy (top-1 = reference token)")
        ax.legend(fontsize=6, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("F-calib: token-level reliability diagrams (test split, teacher-forced)", fontsize=11)
    _save(fig, out_stem)
    plt.close(fig)


def fig_calibrate(table_spec: dict, out_stem: str):
    """F-calibrate: both sides of the calibration rule against the learning rate — the squeezing signature (the
    control's top-1 gain over SFT, its positives' Δlog p) and the task and fluency kept (CIDEr as a share of the
    Stage-1 model's, broken captions) — with the rule's thresholds and the lr it picks; the control's TV to the
    reference (the fallback's measure) and CHAIR_s for context."""
    from .report import calibration_choice, calibration_rows
    plt = _plt()
    rows = calibration_rows(table_spec)
    choice, how = calibration_choice(rows, table_spec["control_tv"])  # (in the table's order)
    betas = sorted({r["beta"] for r in rows}, key=lambda b: (b is None, b))
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 6.6))
    axes = axes.ravel()
    panels = [(lambda r: (r["gain"]["diff"], r["gain"]["lo"], r["gain"]["hi"]),
               f"signature: top-1 mass − {table_spec['rows'][0]['name']}", table_spec["top1_gain"]),
              (lambda r: (r["dlogp"]["mean"], r["dlogp"]["lo"], r["dlogp"]["hi"]),
               "signature: Δlog p of the positives (last probe)", 0.0),
              (lambda r: (r["tv"]["mean"], r["tv"]["lo"], r["tv"]["hi"]),
               "TV to the reference (fallback: nearest the line)", table_spec["control_tv"]),
              (lambda r: (r["task"], None, None), "task kept: CIDEr / the Stage-1 model's", table_spec["task_share"]),
              (lambda r: (None if r["broken"] is None else 100 * r["broken"], None, None),
               "fluency kept: broken captions (%)", 100 * table_spec["max_broken"]),
              (lambda r: (r["chair_s"]["mean"], r["chair_s"]["lo"], r["chair_s"]["hi"]), "CHAIR_s (%)", None)]
    for ax, (value, title, threshold) in zip(axes, panels):
        for n, beta in enumerate(betas):  # one line per β, against the learning rate
            line = sorted((r for r in rows if r["beta"] == beta), key=lambda r: r["lr"])
            pts = [(r["lr"], *value(r), r["meets"]) for r in line if value(r)[0] is not None]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            lo = [y - (p[2] if p[2] is not None else y) for y, p in zip(ys, pts)]
            hi = [(p[3] if p[3] is not None else y) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=COLORS[n % len(COLORS)],
                        label=f"β {beta:g}" if beta is not None else None)
            for x, y, *_, meets in pts:  # ringed: the row meets both sides of the rule
                if meets:
                    ax.plot(x, y, "o", mfc="none", mec="k", ms=11, zorder=3)
        if threshold is not None:
            ax.axhline(threshold, color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        if len(betas) > 1:
            ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("Stage-2 learning rate")
        ax.grid(alpha=0.3)
        if choice:
            ax.axvline(choice["lr"], color="gray", lw=1.0, alpha=0.6)
    by = "the fallback" if how.startswith("fallback") else "the rule"
    fig.suptitle("F-calibrate: the control arm's squeezing signature and its task and fluency against the learning "
                 "rate" + (f" (lr = {choice['lr']:g}, β = {choice['beta']:g}, by {by})" if choice else f" ({how})"),
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, out_stem)
    plt.close(fig)


VERDICT_COLORS = {"holds": "#2ca02c", "does not hold": "#d62728", "inconclusive": "#7f7f7f"}


def fig_scale(table_spec: dict, out_stem: str):
    """F-scale: one panel per claim of T-scale, its A − B and 95% interval at each size against the size's
    parameter count (log axis), coloured by the verdict; a size whose parameter count is unknown is left out
    and said in the panel."""
    from .report import arms_results
    plt = _plt()
    results = arms_results(table_spec)
    claims = table_spec["claims"]
    cols = min(4, len(claims))
    rows = math.ceil(len(claims) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    sized = [(r["info"]["parameters"], r) for r in results if "parameters" in r["info"]]
    for ax, (i, c) in zip(axes.flat, enumerate(claims)):
        pts = [(n, r["name"], r["claims"][i]) for n, r in sorted(sized, key=lambda x: x[0])
               if r["claims"][i]["diff"] is not None]
        for n, name, x in pts:
            lo = x["diff"] - (x["lo"] if x["lo"] is not None else x["diff"])
            hi = (x["hi"] if x["hi"] is not None else x["diff"]) - x["diff"]
            ax.errorbar([n], [x["diff"]], yerr=[[lo], [hi]], marker="o", capsize=3, color=VERDICT_COLORS[x["verdict"]])
            ax.annotate(name, (n, x["diff"]), fontsize=6, textcoords="offset points", xytext=(4, 4))
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[2]["diff"] for p in pts], color="k", lw=0.6, alpha=0.5)
        if not pts:
            ax.text(0.5, 0.5, "n/a: no size with this gap measured", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="gray")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter
        ax.xaxis.set_minor_formatter(NullFormatter())  # (minor labels of a short log range overlap)
        ax.set_title(_wrap(f"{c['claim']}", 38), fontsize=8)
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"{c['column']}: {c['a']} − {c['b']}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(claims):]:
        ax.set_axis_off()
    handles = [plt.Line2D([], [], marker="o", color=col, ls="", label=v) for v, col in VERDICT_COLORS.items()]
    fig.suptitle("F-scale: CW-DPO's gaps against model size (mean over seeds, 95% interval; colour: verdict)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    _save(fig, out_stem, layout=False)
    plt.close(fig)


def _wrap(text: str, width: int = 40) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def write_figure(spec: dict, out_stem: str):
    kind = spec["kind"]
    if "series" in spec:  # [[label, paths], ...] in config order -> an ordered dict
        spec = {**spec, "series": {label: paths for label, paths in spec["series"]}}
    if kind == "stage1":
        fig_stage1(spec["series"], out_stem, spec.get("spice_reason"))
    elif kind == "squeeze":
        fig_squeeze(spec["series"], out_stem)
    elif kind == "floor":
        rows = []
        for r in spec["rows"]:
            floors = [read_json(p).get("l_floor") for p in r["metrics"] if os.path.isfile(p)]
            rows.append({**r, "l_floor": float(np.mean(floors)) if floors else None})
        fig_floor(rows, out_stem, spec["scale"])
    elif kind == "calibration":
        fig_calibration(spec["series"], out_stem)
    elif kind == "calibrate":
        fig_calibrate(spec["table"], out_stem)
    elif kind == "scale":
        fig_scale(spec["table"], out_stem)
    else:
        raise ValueError(f"unknown figure {kind!r}")


# ---------------------------------------------------------------------------------------------------
# figure specs (built from the plan at workflow parse time; no torch)

def _series_keys(plan, series: dict) -> list:
    """[(label, model keys)] in config order (a list: JSON specs sort dict keys, colours follow order)."""
    return [(label, plan.row_keys({"name": label, **sel})) for label, sel in series.items()]


def figure_spec(plan, name: str) -> dict:
    """The spec of `cwdpo figure` for figure `name` of the config."""
    from .report import table_rows
    f = plan.enabled_figures()[name]
    spec = {"kind": name, "scale": plan.c["evaluate"]["scale"]}
    if name in ("stage1", "squeeze"):
        spec["series"] = [[label, [plan.run_file(k, "probes") for k in keys if plan.run_file(k)]]
                          for label, keys in _series_keys(plan, f["series"])]
        if name == "stage1" and "SPICE" not in plan.c["evaluate"]["metrics"]:
            spec["spice_reason"] = "SPICE is not in evaluate.metrics"
        elif name == "stage1":
            spec["spice_reason"] = ("SPICE over training steps is not probed (it runs a Java parser per "
                                    "call); the final top-5 SPICE is in scores.json when available")
    elif name == "calibration":
        spec["series"] = [[label, [plan.path("measures", key=k) for k in keys]]
                          for label, keys in _series_keys(plan, f["series"])]
    elif name in ("calibrate", "scale"):
        from .report import table_spec
        spec["table"] = table_spec(plan, f["table"])
    elif name == "floor":
        spec["rows"] = []
        for row in table_rows(plan, plan.c["tables"][f["table"]]):
            keys = row["keys"]
            runs = [k for k in keys if plan.run_file(k)]
            spec["rows"].append({"name": row["name"], "scores": [plan.path("scores", key=k) for k in keys],
                                 "measures": [plan.path("measures", key=k) for k in keys],
                                 "probes": [plan.run_file(k, "probes") for k in runs],
                                 "metrics": [plan.run_file(k, "metrics") for k in runs]})
    return spec


def figure_inputs(plan, name: str) -> list:
    """Every file the figure reads (its rule's inputs)."""
    if name in ("calibrate", "scale"):
        from .report import table_inputs
        return table_inputs(plan, plan.enabled_figures()[name]["table"])
    spec = figure_spec(plan, name)
    files = [p for _, paths in spec.get("series", []) for p in paths]
    for r in spec.get("rows", []):
        files += r["scores"] + r["measures"] + r["probes"] + r["metrics"]
    return sorted(set(files))
