"""Train/test splits of a :class:`~perturbax.data.PerturbationData` by condition.

Every split holds out whole conditions (all cells of a perturbation), never single cells of a
condition: the question is always "predict a perturbation nobody measured". The control stays in
training. All splits return :class:`Split` objects whose ``train`` and ``test`` share the
registry of the full data, so labels and design vectors mean the same thing in both.

Groups (``Split.test_groups``) say *why* a held-out condition is hard:

- ``"single_unseen"``: a single perturbation held out;
- ``"combo_seen{k}"``: a combination of which ``k`` components are measured alone (as a single)
  in the training data. For pairs, ``combo_seen2`` is inside the span of the training singles and
  ``combo_seen0``/``combo_seen1`` are not;
- ``"holdout"``: the default of :func:`holdout_split` (or a name you pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from perturbax.data.core import PerturbationData
from perturbax.data.labels import LabelLike

__all__ = [
    "Split",
    "holdout_split",
    "norman_doubles_folds",
    "gears_split",
    "split_from_column",
    "combo_group",
]


@dataclass(frozen=True, repr=False)
class Split:
    """One train/test split (immutable).

    Attributes
    ----------
    name
        Human-readable name, e.g. ``"norman-doubles/fold0"``.
    train, test
        The cells of the training and test conditions (same registry and genes as the source).
    test_groups
        Canonical label of each held-out condition -> group name (see the module docstring).
    """

    name: str
    train: PerturbationData
    test: PerturbationData
    test_groups: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "test_groups", MappingProxyType(dict(self.test_groups)))

    @property
    def test_labels(self) -> tuple[str, ...]:
        """Canonical labels of the held-out conditions (in ``test_groups`` order)."""
        return tuple(self.test_groups)

    @property
    def train_labels(self) -> tuple[str, ...]:
        """Canonical labels of the training conditions (control first)."""
        return self.train.conditions

    def groups(self) -> dict[str, list[str]]:
        """``{group: [labels]}`` of the held-out conditions."""
        out: dict[str, list[str]] = {}
        for label, group in self.test_groups.items():
            out.setdefault(group, []).append(label)
        return out

    def labels_in(self, group: str) -> list[str]:
        """Held-out labels of one group; a clear error for an unknown group name."""
        groups = self.groups()
        if group not in groups:
            raise KeyError(f"Split {self.name!r} has no test group {group!r}; groups: {sorted(groups)}.")
        return groups[group]

    def __repr__(self) -> str:
        counts = {g: len(v) for g, v in self.groups().items()}
        return (
            f"Split {self.name!r}: train {self.train.n_cells} cells / {self.train.n_conditions} conditions, "
            f"test {self.test.n_cells} cells / {self.test.n_conditions} conditions {counts}"
        )


def _n_components(design_row: np.ndarray) -> int:
    return int(np.count_nonzero(design_row))


def _measured_singles(data: PerturbationData) -> set[str]:
    """Elementary perturbations measured alone (a condition with exactly that one component)."""
    out = set()
    for row in data.design:
        nz = np.flatnonzero(row)
        if nz.size == 1:
            out.add(data.registry.names[int(nz[0])])
    return out


def combo_group(data: PerturbationData, label: LabelLike, seen_singles: Iterable[str]) -> str:
    """Group name of one condition given the set of elementary perturbations seen as singles.

    Singles give ``"single_seen"``/``"single_unseen"``, combinations ``"combo_seen{k}"`` with ``k``
    the number of components in ``seen_singles``, the control ``"control"``.
    """
    seen = set(seen_singles)
    comps = data.registry.components(label)
    if not comps:
        return "control"
    if len(comps) == 1:
        return "single_seen" if next(iter(comps)) in seen else "single_unseen"
    return f"combo_seen{sum(name in seen for name in comps)}"


def _make_split(data: PerturbationData, name: str, groups: Mapping[str, str]) -> Split:
    if not groups:
        raise ValueError(f"Split {name!r} holds out no condition; nothing to test on.")
    idx = sorted(data.condition_index(lab) for lab in groups)
    mask = np.isin(data.env, idx)
    train = data.subset(~mask)
    test = data.subset(mask)
    return Split(name=name, train=train, test=test, test_groups=dict(groups))


def _check_control(data: PerturbationData, what: str) -> None:
    if data.control_index is None:
        raise ValueError(
            f"{what} needs control cells in training, but no cell has the control label "
            f"{data.control!r}. Build the data with from_anndata(..., control=<your control label>)."
        )


def holdout_split(
    data: PerturbationData,
    holdout: LabelLike | Iterable[LabelLike],
    *,
    name: str = "holdout",
    group: str = "holdout",
) -> Split:
    """Hold out the named conditions (any label spelling); train on all other cells.

    Parameters
    ----------
    data
        All cells.
    holdout
        One label or several (``"A+B"``, ``"B+A"``, ``{"A": 1, "B": 1}`` and a label vector all
        name the same condition). Every label must have cells in ``data``.
    name
        Name of the split.
    group
        Group name given to every held-out condition in ``Split.test_groups``.
    """
    if isinstance(holdout, (str, Mapping, np.ndarray)):
        holdout = [holdout]
    labels: list[str] = []
    for lab in holdout:
        canon = data.conditions[data.condition_index(lab)]  # KeyError naming it if zero cells
        if canon == data.control:
            raise ValueError(
                f"Cannot hold out the control condition {data.control!r}: every baseline and model "
                f"needs control cells in training. Hold out perturbed conditions only."
            )
        if canon not in labels:
            labels.append(canon)
    if not labels:
        raise ValueError("holdout is empty; name at least one perturbation to hold out, e.g. ['A+B'].")
    _check_control(data, "holdout_split")
    return _make_split(data, name, {lab: group for lab in labels})


def norman_doubles_folds(data: PerturbationData, n_folds: int = 5, *, name: str = "norman-doubles") -> list[Split]:
    """The ``norman-doubles`` protocol (DESIGN section 6): folds over the double perturbations.

    The doubles (conditions with exactly two components) are sorted by canonical label; fold ``k``
    holds out the doubles with index ``i % n_folds == k`` and trains on everything else (control,
    singles, the other doubles and any higher-order combinations). Each held-out double is grouped
    ``combo_seen{0,1,2}`` by how many of its components are measured alone in training.
    """
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise ValueError(f"n_folds must be a positive integer, got {n_folds!r}.")
    _check_control(data, "norman_doubles_folds")
    doubles = sorted(c for c, row in zip(data.conditions, data.design) if _n_components(row) == 2)
    if not doubles:
        raise ValueError(
            f"The data have no double perturbations (conditions with exactly two components, e.g. "
            f"'A+B'); conditions present: {list(data.conditions)[:10]}. Check the separator (sep=) "
            f"used in from_anndata."
        )
    if n_folds > len(doubles):
        raise ValueError(
            f"n_folds={n_folds} is larger than the number of doubles ({len(doubles)}); some folds "
            f"would be empty. Use n_folds <= {len(doubles)}."
        )
    splits = []
    for k in range(n_folds):
        held = [d for i, d in enumerate(doubles) if i % n_folds == k]
        idx = [data.condition_index(d) for d in held]
        train = data.subset(~np.isin(data.env, idx))
        seen = _measured_singles(train)
        groups = {d: combo_group(data, d, seen) for d in held}
        splits.append(_make_split(data, f"{name}/fold{k}", groups))
    return splits


def gears_split(
    data: PerturbationData,
    *,
    seed: int,
    unseen_single_fraction: float = 0.25,
    seen2_test_fraction: float = 0.25,
    name: str | None = None,
) -> Split:
    """GEARS-style split (Roohani et al. 2023, "simulation" split), deterministic by ``seed``.

    1. A random ``unseen_single_fraction`` of the elementary perturbations measured alone is held
       out: their single conditions (at any dose) go to test as ``"single_unseen"``.
    2. Every combination is classified by how many of its components remain measured alone in
       training: ``"combo_seen{k}"``. Combinations with any unseen component go to test (for pairs:
       ``combo_seen0`` and ``combo_seen1``), so no training cell carries a held-out single.
    3. A random ``seen2_test_fraction`` of the fully seen combinations (``combo_seen2`` for pairs)
       goes to test; the rest train.

    The control always trains. A component never measured alone counts as unseen.
    """
    _check_control(data, "gears_split")
    for arg, val in [("unseen_single_fraction", unseen_single_fraction), ("seen2_test_fraction", seen2_test_fraction)]:
        if not (0.0 <= float(val) < 1.0):
            raise ValueError(f"{arg} must be in [0, 1), got {val!r}.")
    rng = np.random.default_rng(seed)
    measured = sorted(_measured_singles(data))
    n_unseen = int(round(unseen_single_fraction * len(measured)))
    if unseen_single_fraction > 0 and measured:
        n_unseen = max(1, n_unseen)
    if measured and n_unseen >= len(measured):
        raise ValueError(
            f"unseen_single_fraction={unseen_single_fraction} would hold out all {len(measured)} "
            f"measured singles; lower it so that some singles train."
        )
    unseen = set(rng.choice(measured, size=n_unseen, replace=False).tolist()) if n_unseen else set()
    seen = set(measured) - unseen

    groups: dict[str, str] = {}
    all_seen_combos: list[str] = []
    for label, row in zip(data.conditions, data.design):
        k = _n_components(row)
        if k == 0:
            continue
        g = combo_group(data, label, seen)
        if k == 1:
            if g == "single_unseen":
                groups[label] = g
        elif g == f"combo_seen{k}":
            all_seen_combos.append(label)
        else:
            groups[label] = g
    all_seen_combos.sort()
    n_seen2 = int(round(seen2_test_fraction * len(all_seen_combos)))
    if n_seen2:
        chosen = rng.choice(len(all_seen_combos), size=n_seen2, replace=False)
        for i in sorted(chosen.tolist()):
            label = all_seen_combos[i]
            groups[label] = combo_group(data, label, seen)
    order = {c: i for i, c in enumerate(data.conditions)}
    groups = dict(sorted(groups.items(), key=lambda kv: order[kv[0]]))
    return _make_split(data, name or f"gears/seed{seed}", groups)


def split_from_column(
    adata,
    perturbation_key: str,
    control: str,
    *,
    split_key: str = "split",
    train_value: str = "train",
    test_value: str = "test",
    name: str | None = None,
    **from_anndata_kwargs,
) -> Split:
    """A split given per cell in ``adata.obs[split_key]`` (e.g. by a simulator).

    Cells whose value is ``train_value`` train and ``test_value`` test; other values are an error.
    Control cells may appear in both (test control cells are ignored by ``test_groups``).
    ``from_anndata_kwargs`` go to :func:`~perturbax.data.from_anndata` (``sep``, ``layer``, ...).
    """
    from perturbax.data.core import _missing_key, from_anndata

    if split_key not in adata.obs.columns:
        raise _missing_key("adata.obs", split_key, adata.obs.columns, "column (split_key)")
    values = adata.obs[split_key].astype(str).to_numpy()
    bad = sorted(set(values) - {train_value, test_value})
    if bad:
        raise ValueError(
            f"obs[{split_key!r}] has values {bad[:5]} besides {train_value!r}/{test_value!r}; "
            f"mark every cell as one of the two (or pass train_value=/test_value=)."
        )
    data = from_anndata(adata, perturbation_key, control, **from_anndata_kwargs)
    is_test = values == test_value
    train = data.subset(~is_test)
    test = data.subset(is_test)
    if train.control_index is None:
        raise ValueError(
            f"No control cell ({control!r}) is marked {train_value!r} in obs[{split_key!r}]; "
            f"baselines and models need control cells in training."
        )
    seen = _measured_singles(train)
    groups = {lab: combo_group(test, lab, seen) for lab in test.conditions if lab != control}
    if not groups:
        raise ValueError(f"No perturbed cell is marked {test_value!r} in obs[{split_key!r}]; nothing to test on.")
    return Split(name=name or f"column:{split_key}", train=train, test=test, test_groups=groups)
