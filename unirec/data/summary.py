"""A data set in a few lines: what ``unirec data info`` prints."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from .dataset import Dataset, FeatureTable


def _feature_lines(ft: Optional[FeatureTable], what: str) -> List[str]:
    if ft is None:
        return [f"{what} features: none"]
    lines = [f"{what} features ({len(ft.features)}, as TBE tables with the id table: "
             f"{sum(ft.table_sizes())} rows):"]
    for f in ft.features:
        lens = np.diff(f.offsets)[1:]
        cover = float((lens > 0).mean()) if len(lens) else 0.0
        extra = f", buckets {' '.join(str(v) for v in f.vocab[1:])}" if f.kind == "numeric" else ""
        lines.append(f"  {f.name:<14} {f.kind:<11} vocab {f.size - 1:>7}  values/{what.lower()} "
                     f"{lens.mean() if len(lens) else 0:.2f}  coverage {cover:.1%}{extra}")
    return lines


def describe(ds: Dataset) -> str:
    """A text summary for ``unirec data info``: counts, sparsity, sequence lengths, ratings, time, features."""
    n, U, I = ds.num_interactions, ds.num_users, ds.num_items
    per_user = np.bincount(ds.user, minlength=U + 1)[1:]
    per_item = np.bincount(ds.item, minlength=I + 1)[1:]
    pairs = np.unique(ds.user.astype(np.int64) * (I + 1) + ds.item).size if n else 0
    lines = [
        f"dataset {ds.name}",
        f"  users {U:,}  items {I:,}  interactions {n:,}  (distinct user-item pairs {pairs:,})",
        f"  density {n / max(U * I, 1):.4%}  sparsity {1 - pairs / max(U * I, 1):.4%}",
    ]
    if U:
        q = np.percentile(per_user, [0, 25, 50, 75, 100])
        lines.append(f"  sequence length per user: min {q[0]:.0f}  p25 {q[1]:.0f}  median {q[2]:.0f}  "
                     f"mean {per_user.mean():.1f}  p75 {q[3]:.0f}  max {q[4]:.0f}")
    if I:
        top = np.sort(per_item)[::-1]
        share = top[: max(1, I // 100)].sum() / max(n, 1)
        lines.append(f"  interactions per item: median {np.median(per_item):.0f}  max {top[0]}  "
                     f"top 1% of items hold {share:.1%}")
    if ds.rating is not None and n:
        vals, counts = np.unique(ds.rating, return_counts=True)
        if len(vals) <= 11:
            dist = "  ".join(f"{v:g}: {c / n:.1%}" for v, c in zip(vals, counts))
        else:
            dist = f"min {vals[0]:g}  mean {ds.rating.mean():.3f}  max {vals[-1]:g}"
        lines.append(f"  ratings: {dist}")
    else:
        lines.append("  ratings: none")
    if n:
        t0, t1 = ds.timestamp.min(), ds.timestamp.max()
        lines.append(f"  timestamps: {t0:.0f} .. {t1:.0f} (span {(t1 - t0) / 86400:.1f} days if seconds)")
    lines += _feature_lines(ds.item_features, "Item")
    lines += _feature_lines(ds.user_features, "User")
    if ds.item_text is not None:
        lines.append(f"  item text: {int((ds.item_text[1:] != '').sum()):,} items, e.g. {str(ds.item_text[1])!r}")
    return "\n".join(lines)
