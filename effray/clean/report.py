"""The cleaning step's outputs: removed.parquet, candidates.parquet, clean_report.json/.md
and the PNG grids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effray.atomic import write_file, write_json
from effray.data.arrays import load_arrays

REMOVED = pa.schema(
    [
        ("split", pa.string()),
        ("index", pa.int64()),
        ("reason", pa.string()),
        ("match", pa.string()),
        ("duplicate_of_split", pa.string()),
        ("duplicate_of_index", pa.int64()),
        ("score", pa.float64()),
        ("given", pa.int64()),
        ("predicted", pa.int64()),
        ("given_confidence", pa.float64()),
        ("predicted_confidence", pa.float64()),
        ("dropped", pa.bool_()),
    ]
)


CANDIDATES = pa.schema(
    [
        ("rank", pa.int64()),
        ("kind", pa.string()),
        ("split", pa.string()),
        ("index", pa.int64()),
        ("label", pa.int64()),
        ("match_split", pa.string()),
        ("match_index", pa.int64()),
        ("match_label", pa.int64()),
        ("similarity", pa.float64()),
        ("score", pa.float64()),
        ("flagged", pa.bool_()),
    ]
)
CANDIDATE_GRID = 32  # pairs in candidates.png: the top of the list a person reviews


def candidate_rows(candidates: dict[str, np.ndarray] | None, rows: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """The ranked pairs (row positions, :func:`effray.clean.near.ranked_pairs`) as
    candidates.parquet's columns; none without a near search."""
    if candidates is None:
        return {f.name: [] for f in CANDIDATES}
    a, b = candidates["a"], candidates["b"]
    return {
        "rank": list(range(1, len(a) + 1)),
        "kind": candidates["kind"].tolist(),
        "split": rows["origin"][a].tolist(),
        "index": rows["index"][a].tolist(),
        "label": rows["label"][a].tolist(),
        "match_split": rows["origin"][b].tolist(),
        "match_index": rows["index"][b].tolist(),
        "match_label": rows["label"][b].tolist(),
        "similarity": candidates["similarity"].tolist(),
        "score": candidates["score"].tolist(),
        "flagged": candidates["flagged"].tolist(),
    }


def write_candidates(path: Path, candidates: dict[str, np.ndarray] | None, rows: dict[str, np.ndarray]) -> None:
    """candidates.parquet: the top-scoring pairs, flagged or not, best first, for review."""
    cols = candidate_rows(candidates, rows)
    table = pa.table({k: pa.array(v, CANDIDATES.field(k).type) for k, v in cols.items()}, schema=CANDIDATES)
    write_file(path, lambda tmp: pq.write_table(table, tmp))


def candidate_summary(candidates: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
    """The report's line on candidates.parquet."""
    if candidates is None:
        return None
    kinds = candidates["kind"]
    return {
        "pairs": int(len(kinds)),
        "flagged": int(candidates["flagged"].sum()),
        "leak_pairs": int(np.sum(kinds == "leak")),
        "lowest_score": float(candidates["score"][-1]) if len(kinds) else None,
    }


def write_removed(path: Path, findings: list[dict[str, Any]]) -> None:
    """One row per finding (a row flagged twice, say leak and label issue, appears twice)."""
    cols = {f.name: [r.get(f.name) for r in findings] for f in REMOVED}
    cols["given"] = [r.get("given", r.get("label")) for r in findings]
    table = pa.table({k: pa.array(v, REMOVED.field(k).type) for k, v in cols.items()}, schema=REMOVED)
    write_file(path, lambda tmp: pq.write_table(table, tmp))


def summarise(findings: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Counts per reason, per reason and split, per reason and (given) class, per leak match."""
    per_class: dict[str, dict[str, int]] = {}
    per_split: dict[str, dict[str, int]] = {}
    for r in findings:
        given = r.get("given", r.get("label"))
        c = per_class.setdefault(r["reason"], {})
        c[classes[given]] = c.get(classes[given], 0) + 1
        s = per_split.setdefault(r["reason"], {})
        s[r["split"]] = s.get(r["split"], 0) + 1
    return {
        "counts": dict(sorted(Counter(r["reason"] for r in findings).items())),
        "per_split": per_split,
        "per_class": per_class,
        "matches": {
            reason: dict(Counter(r["match"] for r in findings if r["reason"] == reason))
            for reason in ("duplicate", "near_duplicate", "leak")
        },
    }


def markdown(report: dict[str, Any]) -> str:
    """clean_report.md: the same figures as the JSON, for people."""
    lines = [
        f"# Cleaning report: {report['data']}",
        "",
        f"Dataset checksum `{report['data_checksum']}`; rows {report['rows']}"
        + (f"; reference `{report['reference']}` ({report['reference_rows']} rows)" if report.get("reference") else "")
        + ".",
        "",
        "| reason | rows | " + " | ".join(report["classes"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in report["classes"]) + " |",
    ]
    for reason, n in report["counts"].items():
        per = report["per_class"].get(reason, {})
        lines.append(f"| {reason} | {n} | " + " | ".join(str(per.get(c, 0)) for c in report["classes"]) + " |")
    if not report["counts"]:
        lines.append("| (nothing flagged) | 0 | " + " | ".join("0" for _ in report["classes"]) + " |")
    leak = report["matches"].get("leak") or {}
    lines += [
        "",
        f"Leaks: {leak.get('exact', 0)} exact, {leak.get('near', 0)} near (train rows only; the evaluation side and "
        "the reference are never touched).",
    ]
    near = report.get("near")
    if near:
        lines += [
            "",
            "## Near duplicates",
            "",
            f"Threshold **{near['threshold']:.4f}** ({near['source']}). {near['meaning']}",
            "",
            f"Definition: {near['definition']}.",
            f"Embedding: {near['embedding']}",
            "",
            "| copy kind | recall at the threshold |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in near["recall_per_kind"].items()]
        if near.get("leak_precision_at_least") is not None:
            lines += [
                "",
                f"Leaks: {near['eval_images_flagged']} of {near['eval_images']} evaluation/reference images have a "
                f"train image above the threshold; at {near['real_images_above']:.1%} of real images above it by "
                f"chance, their precision is at least {near['leak_precision_at_least']:.2f}.",
            ]
    cand = report.get("candidates")
    if cand:
        lines += [
            "",
            "## Candidates for review",
            "",
            f"`candidates.parquet`: the {cand['pairs']} highest-scoring pairs ({cand['leak_pairs']} train-evaluation, "
            f"the rest within a split), best first, {cand['flagged']} above the threshold; `candidates.png` shows the "
            "top of the list. Pairs below the threshold are where a person finds the copies it missed.",
        ]
    labels = report.get("labels")
    if labels:
        lines += [
            "",
            "## Label issues",
            "",
            f"{labels['method']}; train: {labels['folds']}-fold out-of-sample probabilities "
            f"(fold accuracy {', '.join(f'{a:.3f}' for a in labels['fold_accuracy'])}); evaluation splits: "
            f"{labels['eval_model']}"
            + (f" (accuracy {labels['eval_accuracy']})" if labels.get("eval_accuracy") else "")
            + ".",
            "",
        ]
        if labels["top"]:
            lines += [
                "| split | index | given | predicted | p(given) | p(predicted) |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {t['split']} | {t['index']} | {t['given']} | {t['predicted']} | {t['given_confidence']:.3f} | "
                f"{t['predicted_confidence']:.3f} |"
                for t in labels["top"]
            ]
    dropped = report.get("dropped")
    lines += ["", "## Output", ""]
    if dropped:
        lines.append(
            f"Dropped {dropped['rows']} rows ({', '.join(dropped['reasons'])}) into `data/`: {dropped['counts']} "
            "remain."
        )
    else:
        lines.append("Report only: nothing dropped (pass --drop duplicates,leaks,labels to write a cleaned dataset).")
    lines += [f"- `{name}`" for name in report["files"]]
    return "\n".join(lines) + "\n"


def save_pairs_grid(
    path: Path,
    pairs: list[tuple[np.ndarray, np.ndarray, str]],
    title: str = "duplicate pairs: flagged row (left), its match (right)",
) -> None:
    """Flagged row | the row it copies, side by side, a caption above each pair."""
    _grid(
        path,
        [(np.concatenate([a, np.full((a.shape[0], 2, a.shape[2]), 255, np.uint8), b], 1), c) for a, b, c in pairs],
        title,
    )


def save_issue_grid(path: Path, items: list[tuple[np.ndarray, str]]) -> None:
    _grid(path, items, "label issues: given -> predicted (confidence)")


def _grid(path: Path, items: list[tuple[np.ndarray, str]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 1.6 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, items):
        ax.imshow(
            image[:, :, 0] if image.shape[2] == 1 else image,
            cmap="gray" if image.shape[2] == 1 else None,
            interpolation="nearest",
        )
        ax.set_title(caption, fontsize=7)
    if not items:
        axes.flat[0].text(0.5, 0.5, "nothing flagged", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> None:
    write_json(out / "clean_report.json", report)
    write_file(out / "clean_report.md", lambda tmp: tmp.write_text(markdown(report)))


def save_grids(
    out: Path,
    findings: list[dict[str, Any]],
    candidates: dict[str, np.ndarray] | None,
    rows: dict[str, np.ndarray],
    data: str,
    train: dict[str, np.ndarray],
    ref: tuple[str, dict[str, Any]] | None,
    classes: list[str],
    groups: int,
) -> None:
    """``out/duplicates.png`` (the highest-scoring pairs of each reason) and
    ``out/label_issues.png`` (the least self-confident issues), ``groups`` of each at most,
    and ``out/candidates.png`` (the top :data:`CANDIDATE_GRID` candidate pairs); the images
    of a split other than train are read when a finding first needs one."""
    cache: dict[str, dict[int, np.ndarray]] = {"train": dict(zip(train["index"].tolist(), train["image"]))}

    def image(origin: str, index: int) -> np.ndarray:
        if origin not in cache:
            d, splits = (ref[0], ref[1]["splits"]) if origin == "reference" else (data, [origin])
            cache[origin] = {}
            for s in splits:
                a = load_arrays(d, s)
                cache[origin].update(zip(a["index"].tolist(), a["image"]))
        return cache[origin][index]

    dups = [f for f in findings if f["duplicate_of_index"] is not None]
    per = max(1, groups // max(1, len({f["reason"] for f in dups})))
    chosen = []
    for reason in ("leak", "duplicate", "near_duplicate"):
        chosen += sorted((f for f in dups if f["reason"] == reason), key=lambda f: -f["score"])[:per]
    save_pairs_grid(
        out / "duplicates.png",
        [
            (
                image(f["split"], f["index"]),
                image(f["duplicate_of_split"], f["duplicate_of_index"]),
                f"{f['reason']} ({f['match']}) {f['score']:.3f}\n{f['split']} {f['index']} ~ "
                f"{f['duplicate_of_split']} {f['duplicate_of_index']}",
            )
            for f in chosen[:groups]
        ],
    )
    cand = candidate_rows(candidates, rows)

    def caption(i: int) -> str:
        flag = " (flagged)" if cand["flagged"][i] else ""
        return (
            f"#{cand['rank'][i]} {cand['kind'][i]} {cand['score'][i]:.2f}{flag}\n"
            f"{cand['split'][i]} {cand['index'][i]} ~ {cand['match_split'][i]} {cand['match_index'][i]}"
        )

    save_pairs_grid(
        out / "candidates.png",
        [
            (
                image(cand["split"][i], cand["index"][i]),
                image(cand["match_split"][i], cand["match_index"][i]),
                caption(i),
            )
            for i in range(min(CANDIDATE_GRID, len(cand["rank"])))
        ],
        "candidate pairs, best first: row (left), its match (right)",
    )
    issues = sorted((f for f in findings if f["reason"] == "label_issue"), key=lambda f: f["given_confidence"])
    save_issue_grid(
        out / "label_issues.png",
        [
            (
                image(f["split"], f["index"]),
                f"{f['split']} {f['index']}: {classes[f['given']]} -> "
                f"{classes[f['predicted']]}\n({f['predicted_confidence']:.2f})",
            )
            for f in issues[:groups]
        ],
    )
