"""Static partitioners: a fixed function condition/labels → group, fit on training metadata only.

GRASP (arXiv:2512.01675; docs/design.md §3) routes every sample to the adapter of its group; the group is decided by an
external prior before training and never learned. A partitioner sees labels (or prompts), never
images, is deterministic, and is saved as JSON next to the checkpoint.

| partitioner | prior | groups |
|---|---|---|
| :class:`FrequencyTiers` | label frequency on the training split | ``[healthy,] head, medium, tail`` |
| :class:`ExplicitMap` | a hand-made label → group table | the table's group names |
| :class:`KMeansPartition` | k-means on label (or prompt) embeddings of any encoder | ``cluster0 …`` |
| :class:`RandomPartition` | none (control): random label → group, group sizes matched | as matched |

A sample's labels are a single label (``"cat"``, ``3``), a sequence of labels (multi-label; empty means
"no finding"), or a mapping with a ``"labels"`` key. Labels are compared as strings. Multi-label samples
follow ``rule``: ``"rarest"`` (default: the group of the sample's rarest label, so every tail sample
updates a tail adapter), ``"majority"`` or ``"first"``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from adapterbank._validation import check_int, check_number
from adapterbank.errors import FormatError, ParameterError, UnknownNameError

logger = logging.getLogger(__name__)

__all__ = [
    "PARTITIONERS",
    "RULES",
    "ExplicitMap",
    "FrequencyTiers",
    "KMeansPartition",
    "Partitioner",
    "RandomPartition",
    "kmeans",
    "labels_from_prompt",
    "load_partitioner",
    "partitioner_from_dict",
    "tier_table",
]

RULES: tuple[str, ...] = ("rarest", "majority", "first")
FORMAT_VERSION = 1


def _label_set(sample: Any, where: str = "sample") -> list[str]:
    """The labels of one sample as a list of strings (order kept, duplicates dropped)."""
    if isinstance(sample, Mapping):
        if "labels" not in sample:
            raise FormatError(f"The {where} is a mapping without a 'labels' key (keys: {sorted(sample)[:8]}).")
        sample = sample["labels"]
    if sample is None:
        return []
    if isinstance(sample, (str, int, np.integer)):
        return [str(int(sample)) if isinstance(sample, np.integer) else str(sample)]
    if isinstance(sample, torch.Tensor):
        sample = sample.tolist()
        if isinstance(sample, int):
            return [str(sample)]
    if isinstance(sample, Iterable):
        out: list[str] = []
        for x in sample:
            if not isinstance(x, (str, int, np.integer)) or isinstance(x, bool):
                raise FormatError(f"A label of {where} must be a str or int. Got {type(x).__name__} ({x!r}).")
            s = str(int(x)) if not isinstance(x, str) else x
            if s not in out:
                out.append(s)
        return out
    raise FormatError(f"The labels of {where} must be a label, a sequence of labels or a mapping with "
                      f"'labels'. Got {type(sample).__name__} instead.")


def labels_from_prompt(prompt: str, vocabulary: Iterable[str]) -> list[str]:
    """The labels of ``vocabulary`` named in a free-text prompt (case-insensitive, whole words).

    Longer labels are matched first, so "Pleural Effusion" wins over "Effusion" at the same place.

    >>> labels_from_prompt("Chest X-ray: pneumothorax, support devices", ["Pneumothorax", "Support Devices", "Edema"])
    ['Pneumothorax', 'Support Devices']
    """
    text = prompt.lower()
    found: list[tuple[int, str]] = []
    taken = [False] * len(text)
    for lab in sorted(set(vocabulary), key=lambda s: (-len(s), s)):
        for m in re.finditer(rf"(?<!\w){re.escape(lab.lower())}(?!\w)", text):
            if not any(taken[m.start():m.end()]):
                found.append((m.start(), lab))
                for i in range(m.start(), m.end()):
                    taken[i] = True
                break
    return [lab for _, lab in sorted(found)]


class Partitioner:
    """Base class: ``fit(train_labels)`` once, then ``assign(labels) -> group id``.

    Subclasses set :attr:`kind`, implement :meth:`_fit` (labels → ``self.label_group``) and
    :meth:`_params`. ``label_group`` maps every training label to its group; ``label_count`` holds the
    training frequency used by the ``"rarest"`` rule.
    """

    kind: ClassVar[str] = "base"

    def __init__(self, *, rule: str = "rarest", healthy_labels: Sequence[str] = ()) -> None:
        if rule not in RULES:
            raise UnknownNameError(f"Unknown multi-label rule {rule!r}. Valid rules: {', '.join(RULES)}.")
        self.rule = rule
        self.healthy_labels: list[str] = [str(x) for x in healthy_labels]
        self.group_names: list[str] = []
        self.label_group: dict[str, int] = {}
        self.label_count: dict[str, int] = {}
        self.fitted = False

    # -- public ------------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        self._check_fitted()
        return len(self.group_names)

    @property
    def healthy_group(self) -> int | None:
        return self.group_names.index("healthy") if self.healthy_labels and "healthy" in self.group_names else None

    def fit(self, train_labels: Sequence[Any]) -> Partitioner:
        """Fit on the training split's labels (one entry per sample); returns ``self``."""
        samples = [_label_set(s, f"training sample {i}") for i, s in enumerate(train_labels)]
        if not samples:
            raise ParameterError(f"{type(self).__name__}.fit needs at least one training sample. Got none.")
        counts: Counter[str] = Counter()
        for labs in samples:
            counts.update(labs)
        self.label_count = dict(sorted(counts.items()))
        self.label_group = {}
        self._fit(samples, counts)
        self.fitted = True
        sizes = self.group_sizes(samples)
        logger.info("%s: %d groups %s with %s samples", self.kind, self.n_groups, self.group_names, sizes)
        return self

    def assign(self, labels: Any) -> int:
        """The group id of one sample from its labels (a label, a list of labels, or ``{"labels": ...}``).

        Raises :class:`UnknownNameError` for a label not seen in training (the message lists valid ones).
        """
        self._check_fitted()
        labs = _label_set(labels)
        healthy = self.healthy_group
        if healthy is not None and all(lab in self.healthy_labels for lab in labs):
            return healthy
        labs = [lab for lab in labs if lab not in self.healthy_labels]
        if not labs:
            raise UnknownNameError(f"{self.kind}: a sample with no labels has no group (no healthy group is "
                                   "configured; pass healthy_labels=... to fit one).")
        unknown = [lab for lab in labs if lab not in self.label_group]
        if unknown:
            valid = sorted(self.label_group)
            shown = ", ".join(repr(v) for v in valid[:20]) + (" ..." if len(valid) > 20 else "")
            raise UnknownNameError(f"{self.kind}: unknown label(s) {unknown}; the partitioner was fit on "
                                   f"{len(valid)} labels: {shown}.")
        groups = [self.label_group[lab] for lab in labs]
        if self.rule == "first" or len(groups) == 1:
            return groups[0]
        if self.rule == "rarest":
            i = min(range(len(labs)), key=lambda j: (self.label_count.get(labs[j], 0), labs[j]))
            return groups[i]
        c = Counter(groups)  # majority; ties go to the group of the rarer labels
        top = max(c.values())
        cands = [g for g in c if c[g] == top]
        return min(cands, key=lambda g: (min(self.label_count.get(lab, 0) for lab, gg in zip(labs, groups) if gg == g), g))

    def assign_batch(self, batch: Sequence[Any]) -> torch.Tensor:
        """Group ids of many samples, a (n,) int64 tensor.

        >>> FrequencyTiers().fit(["a"] * 8 + ["b"] * 3 + ["c"]).assign_batch(["a", "c", ["a", "c"]]).tolist()
        [0, 2, 2]
        """
        return torch.tensor([self.assign(s) for s in batch], dtype=torch.long)

    def assign_prompt(self, prompt: str) -> int:
        """The group of a free-text prompt: the training labels it names (keyword match), then :meth:`assign`."""
        self._check_fitted()
        vocab = list(self.label_group) + self.healthy_labels
        labs = labels_from_prompt(prompt, vocab)
        if not labs and self.healthy_group is None:
            raise UnknownNameError(f"{self.kind}: the prompt {prompt!r} names none of the {len(vocab)} training "
                                   f"labels (e.g. {vocab[:5]}).")
        return self.assign(labs)

    def group_sizes(self, train_labels: Sequence[Any]) -> list[int]:
        """How many of ``train_labels`` fall in each group."""
        c = Counter(self.assign(s) for s in train_labels)
        return [c.get(g, 0) for g in range(self.n_groups)]

    def groups_of_labels(self) -> dict[str, list[str]]:
        """group name → its training labels (sorted by frequency, most frequent first)."""
        self._check_fitted()
        out: dict[str, list[str]] = {n: [] for n in self.group_names}
        for lab in sorted(self.label_group, key=lambda s: (-self.label_count.get(s, 0), s)):
            out[self.group_names[self.label_group[lab]]].append(lab)
        if self.healthy_group is not None:
            out["healthy"] = list(self.healthy_labels)
        return out

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict holding the parameters and the fitted state."""
        self._check_fitted()
        return {"type": self.kind, "format_version": FORMAT_VERSION, "params": self._params(),
                "rule": self.rule, "healthy_labels": list(self.healthy_labels),
                "group_names": list(self.group_names), "label_group": dict(self.label_group),
                "label_count": dict(self.label_count), "state": self._state()}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return p

    # -- for subclasses ----------------------------------------------------------------------------
    def _fit(self, samples: list[list[str]], counts: Counter[str]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        if state:
            raise FormatError(f"{self.kind}: unexpected partitioner state keys {sorted(state)}.")

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ParameterError(f"This {type(self).__name__} is not fitted yet; call fit(train_labels) first.")

    def _tier_counts(self, samples: list[list[str]]) -> Counter[str]:
        return Counter(lab for labs in samples for lab in labs if lab not in self.healthy_labels)

    def _with_healthy(self, names: list[str]) -> list[str]:
        return (["healthy"] if self.healthy_labels else []) + names

    def __repr__(self) -> str:
        state = f"{self.n_groups} groups {self.group_names}" if self.fitted else "unfitted"
        return f"{type(self).__name__}({self._params()}, rule={self.rule!r}, {state})"


class FrequencyTiers(Partitioner):
    """Head / medium / tail tiers by training label frequency (the default GRASP prior).

    Cumulative-mass rule (default): sort labels by count, most frequent first; ``head`` takes labels until
    they cover ≥ ``head`` of all positives, ``medium`` until ``head + medium``, ``tail`` the rest. With
    ``thresholds=(many, few)`` instead: head if count ≥ many, tail if count < few (ImageNet-LT uses
    (100, 20)), medium between. ``healthy_labels`` (e.g. ``["No Finding"]``) form a ``healthy`` group for
    samples whose labels are all healthy (or empty); they are left out of the tier counts.

    >>> part = FrequencyTiers(head=0.5, medium=0.35).fit(["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5)
    >>> part.group_names, part.groups_of_labels()
    (['head', 'medium', 'tail'], {'head': ['a'], 'medium': ['b', 'c'], 'tail': ['d']})
    >>> part.assign(["a", "d"])  # rarest-label rule
    2
    """

    kind = "frequency_tiers"

    def __init__(self, head: float = 0.5, medium: float = 0.35, *, thresholds: Sequence[int] | None = None,
                 healthy_labels: Sequence[str] = (), rule: str = "rarest") -> None:
        super().__init__(rule=rule, healthy_labels=healthy_labels)
        if thresholds is None:
            for name, v in (("head", head), ("medium", medium)):
                check_number(v, name, "FrequencyTiers", low=0.0, high=1.0)
            if head + medium > 1 + 1e-12:
                raise ParameterError(f"FrequencyTiers: head + medium must be ≤ 1. Got {head} + {medium}.")
        else:
            if len(thresholds) != 2 or not all(isinstance(t, int) for t in thresholds) or thresholds[0] < thresholds[1]:
                raise ParameterError("The 'thresholds' parameter of FrequencyTiers must be (many, few) ints with "
                                     f"many ≥ few. Got {thresholds!r} instead.")
        self.head, self.medium = float(head), float(medium)
        self.thresholds = None if thresholds is None else [int(t) for t in thresholds]

    def _params(self) -> dict[str, Any]:
        return {"head": self.head, "medium": self.medium, "thresholds": self.thresholds}

    def _fit(self, samples: list[list[str]], counts: Counter[str]) -> None:
        tc = self._tier_counts(samples)
        self.group_names = self._with_healthy(["head", "medium", "tail"])
        off = len(self.group_names) - 3
        order = sorted(tc, key=lambda s: (-tc[s], s))
        total = sum(tc.values())
        cum = 0
        for lab in order:
            if self.thresholds is not None:
                many, few = self.thresholds
                tier = 0 if tc[lab] >= many else (2 if tc[lab] < few else 1)
            else:
                frac = cum / total if total else 0.0  # mass covered by more frequent labels
                tier = 0 if frac < self.head else (1 if frac < self.head + self.medium else 2)
                cum += tc[lab]
            self.label_group[lab] = off + tier


class ExplicitMap(Partitioner):
    """A hand-made label → group table (clinical or anatomical priors).

    Group names are the table's values (str names, in order of first appearance, or int ids).
    Training labels missing from the table raise :class:`UnknownNameError` at fit time.

    >>> part = ExplicitMap({"cat": "animal", "dog": "animal", "car": "vehicle"}).fit(["cat", "car", "dog"])
    >>> part.group_names, part.assign("dog")
    (['animal', 'vehicle'], 0)
    """

    kind = "explicit"

    def __init__(self, mapping: Mapping[Any, str | int], *, rule: str = "rarest",
                 healthy_labels: Sequence[str] = ()) -> None:
        super().__init__(rule=rule, healthy_labels=healthy_labels)
        if not mapping:
            raise ParameterError("ExplicitMap needs a non-empty label → group mapping.")
        self.mapping = {str(k): v for k, v in mapping.items()}

    def _params(self) -> dict[str, Any]:
        return {"mapping": dict(self.mapping)}

    def _fit(self, samples: list[list[str]], counts: Counter[str]) -> None:
        missing = sorted(lab for lab in counts if lab not in self.mapping and lab not in self.healthy_labels)
        if missing:
            raise UnknownNameError(f"ExplicitMap: training labels {missing[:10]} are not in the mapping "
                                   f"(mapped labels: {sorted(self.mapping)[:10]}).")
        values = list(self.mapping.values())
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            n = max(values) + 1
            names = [f"group{i}" for i in range(n)]
            idx = {v: v for v in values}
        else:
            names = list(dict.fromkeys(str(v) for v in values))
            idx = {v: names.index(str(v)) for v in values}
        self.group_names = self._with_healthy(names)
        off = len(self.group_names) - len(names)
        self.label_group = {lab: off + idx[g] for lab, g in self.mapping.items()}


def kmeans(X: np.ndarray, k: int, seed: int = 0, n_init: int = 8, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means (k-means++ init, Lloyd iterations, best of ``n_init``): (labels (n,), centroids (k,d)).

    >>> lab, _ = kmeans(np.array([[0.0], [0.1], [5.0], [5.1]]), 2)
    >>> bool(lab[0] == lab[1] != lab[2] == lab[3])
    True
    """
    X = np.asarray(X, dtype=np.float64)  # (n, d)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ParameterError(f"k-means needs 1 ≤ k ≤ number of points ({n}). Got k={k} instead.")
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(n_init):
        C = X[[int(rng.integers(n))]]  # (1, d)
        while len(C) < k:
            d2 = ((X[:, None] - C[None]) ** 2).sum(-1).min(1)  # (n,)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            C = np.vstack([C, X[int(rng.choice(n, p=p))]])
        for _ in range(iters):
            lab = ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1)  # (n,)
            newC = np.stack([X[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(k)])
            if np.allclose(newC, C):
                break
            C = newC
        lab = ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1)
        inertia = float(((X - C[lab]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, lab, C)
    assert best is not None
    return best[1], best[2]


class KMeansPartition(Partitioner):
    """k-means on label embeddings (or, via :meth:`assign_prompt`, nearest centroid for free text).

    ``encoder`` is any :mod:`adapterbank.prototypes` encoder (``.encode(list) -> (n, d)``) or a plain
    callable ``list[str] -> array (n, d)``. Each distinct training label is embedded once (``template``
    formats it into a text) and clustered; samples follow ``rule``. The centroids are saved, the encoder
    is not: pass it again to :func:`load_partitioner` to embed unseen prompts.

    >>> emb = lambda xs: [[float(len(x)), 0.0] for x in xs]
    >>> part = KMeansPartition(2, encoder=emb).fit(["ab", "abc", "abcdefgh", "abcdefghi"])
    >>> part.assign("ab") == part.assign("abc") != part.assign("abcdefgh")
    True
    """

    kind = "kmeans"

    def __init__(self, n_groups: int, *, encoder: Any = None, template: str = "{label}", seed: int = 0,
                 rule: str = "rarest", healthy_labels: Sequence[str] = ()) -> None:
        super().__init__(rule=rule, healthy_labels=healthy_labels)
        check_int(n_groups, "n_groups", "KMeansPartition", low=1)
        self.k, self.encoder, self.template, self.seed = n_groups, encoder, template, int(seed)
        self.centroids: np.ndarray | None = None

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.encoder is None:
            raise ParameterError("KMeansPartition needs an 'encoder' to embed labels or prompts.")
        fn: Callable[[list[str]], Any] = getattr(self.encoder, "encode", self.encoder)
        out = fn(texts)
        arr = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] != len(texts) or not np.isfinite(arr).all():
            raise ParameterError(f"KMeansPartition: the encoder returned shape {arr.shape} (or non-finite values) "
                                 f"for {len(texts)} texts; expected ({len(texts)}, d) finite.")
        return arr

    def _params(self) -> dict[str, Any]:
        return {"n_groups": self.k, "template": self.template, "seed": self.seed}

    def _fit(self, samples: list[list[str]], counts: Counter[str]) -> None:
        labels = sorted(self._tier_counts(samples))
        X = self._embed([self.template.format(label=lab) for lab in labels])  # (L, d)
        lab, C = kmeans(X, min(self.k, len(labels)), seed=self.seed)
        # order clusters by total frequency (most frequent first) so group 0 is the "headiest" cluster
        mass = [sum(counts[labels[i]] for i in range(len(labels)) if lab[i] == j) for j in range(len(C))]
        order = sorted(range(len(C)), key=lambda j: (-mass[j], j))
        rank = {j: r for r, j in enumerate(order)}
        self.centroids = C[order]
        self.group_names = self._with_healthy([f"cluster{i}" for i in range(len(C))])
        off = len(self.group_names) - len(C)
        self.label_group = {labels[i]: off + rank[int(lab[i])] for i in range(len(labels))}

    def assign_prompt(self, prompt: str) -> int:
        """Labels named in the prompt if any, else the nearest centroid of the prompt's embedding."""
        self._check_fitted()
        labs = labels_from_prompt(prompt, list(self.label_group) + self.healthy_labels)
        if labs:
            return self.assign(labs)
        assert self.centroids is not None
        e = self._embed([prompt])[0]
        off = len(self.group_names) - len(self.centroids)
        return off + int(((self.centroids - e) ** 2).sum(1).argmin())

    def _state(self) -> dict[str, Any]:
        return {"centroids": None if self.centroids is None else self.centroids.tolist()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        extra = set(state) - {"centroids"}
        if extra:
            raise FormatError(f"kmeans: unexpected partitioner state keys {sorted(extra)}.")
        c = state.get("centroids")
        self.centroids = None if c is None else np.asarray(c, dtype=np.float64)


class RandomPartition(Partitioner):
    """Control: a seeded random label → group map whose group sample counts match ``match``'s.

    Labels are shuffled and each goes, largest first, to the group with the largest remaining deficit
    of samples, so the groups have (nearly) the sizes of the reference partition; with ``match=None``,
    ``n_groups`` groups of nearly equal sample counts.

    >>> ref = FrequencyTiers().fit([c for c, n in zip("abcdef", [40, 20, 10, 5, 3, 2]) for _ in range(n)])
    >>> rnd = RandomPartition(match=ref, seed=1).fit([c for c, n in zip("abcdef", [40, 20, 10, 5, 3, 2]) for _ in range(n)])
    >>> rnd.n_groups
    3
    """

    kind = "random"

    def __init__(self, n_groups: int | None = None, *, match: Partitioner | None = None, seed: int = 0,
                 rule: str = "rarest") -> None:
        super().__init__(rule=rule, healthy_labels=() if match is None else match.healthy_labels)
        if match is None and (not isinstance(n_groups, int) or n_groups <= 0):
            raise ParameterError("RandomPartition needs 'n_groups' (a positive int) or 'match' (a fitted partitioner).")
        self.k = n_groups
        self.match, self.seed = match, int(seed)
        self.targets: list[int] | None = None

    def _params(self) -> dict[str, Any]:
        return {"n_groups": self.k, "seed": self.seed, "targets": self.targets}

    def _fit(self, samples: list[list[str]], counts: Counter[str]) -> None:
        tc = self._tier_counts(samples)
        if self.match is not None:
            sizes = self.match.group_sizes(samples)
            names = [f"random{i}" for i in range(len(sizes))]
            if self.match.healthy_group is not None:
                del sizes[self.match.healthy_group]
                names = names[:-1]
            targets = sizes
        else:
            assert self.k is not None
            n = sum(tc.values())
            targets = [n // self.k + (1 if i < n % self.k else 0) for i in range(self.k)]
            names = [f"random{i}" for i in range(self.k)]
        self.targets = [int(t) for t in targets]
        self.k = len(targets)
        self.group_names = self._with_healthy(names)
        off = len(self.group_names) - len(names)
        rng = np.random.default_rng(self.seed)
        labels = sorted(tc)
        perm = [labels[i] for i in rng.permutation(len(labels))]
        perm.sort(key=lambda s: -tc[s])  # stable: random order among equal counts
        remaining = list(self.targets)
        for lab in perm:
            g = int(np.argmax(remaining))
            self.label_group[lab] = off + g
            remaining[g] -= tc[lab]
        if self.targets and sum(1 for g in set(self.label_group.values())) < len(names):
            logger.warning("RandomPartition: only %d of %d groups got labels", len(set(self.label_group.values())),
                           len(names))


PARTITIONERS: dict[str, type[Partitioner]] = {
    c.kind: c for c in (FrequencyTiers, ExplicitMap, KMeansPartition, RandomPartition)
}

_TOP_KEYS = {"type", "format_version", "params", "rule", "healthy_labels", "group_names", "label_group",
             "label_count", "state"}


def partitioner_from_dict(d: Mapping[str, Any], *, encoder: Any = None, where: str = "partitioner") -> Partitioner:
    """Rebuild a fitted partitioner from :meth:`Partitioner.to_dict` (strict: unknown keys raise).

    >>> p = FrequencyTiers().fit(["a", "a", "b"])
    >>> partitioner_from_dict(p.to_dict()).to_dict() == p.to_dict()
    True
    """
    if not isinstance(d, Mapping):
        raise FormatError(f"{where}: expected a JSON object, got {type(d).__name__}.")
    extra, missing = set(d) - _TOP_KEYS, _TOP_KEYS - set(d)
    if extra or missing:
        raise FormatError(f"{where}: unexpected keys {sorted(extra)} / missing keys {sorted(missing)}; "
                          f"expected exactly {sorted(_TOP_KEYS)}.")
    if d["format_version"] != FORMAT_VERSION:
        raise FormatError(f"{where}: format_version {d['format_version']!r} is not supported (expected {FORMAT_VERSION}).")
    kind = d["type"]
    if kind not in PARTITIONERS:
        raise UnknownNameError(f"{where}: unknown partitioner type {kind!r}. Valid types: {', '.join(PARTITIONERS)}.")
    params = dict(d["params"])
    try:
        if kind == "frequency_tiers":
            p: Partitioner = FrequencyTiers(params["head"], params["medium"], thresholds=params["thresholds"],
                                            healthy_labels=d["healthy_labels"], rule=d["rule"])
        elif kind == "explicit":
            p = ExplicitMap(params["mapping"], rule=d["rule"], healthy_labels=d["healthy_labels"])
        elif kind == "kmeans":
            p = KMeansPartition(params["n_groups"], encoder=encoder, template=params["template"], seed=params["seed"],
                                rule=d["rule"], healthy_labels=d["healthy_labels"])
        else:
            p = RandomPartition(params["n_groups"], seed=params["seed"], rule=d["rule"])
            p.healthy_labels = [str(x) for x in d["healthy_labels"]]
            p.targets = params["targets"]
    except KeyError as e:
        raise FormatError(f"{where}: the params of a {kind!r} partitioner lack key {e}.") from e
    p.group_names = [str(x) for x in d["group_names"]]
    p.label_group = {str(k): int(v) for k, v in d["label_group"].items()}
    p.label_count = {str(k): int(v) for k, v in d["label_count"].items()}
    bad = [k for k, v in p.label_group.items() if not 0 <= v < len(p.group_names)]
    if bad:
        raise FormatError(f"{where}: labels {bad[:5]} map to groups outside 0..{len(p.group_names) - 1}.")
    p._load_state(d["state"])
    p.fitted = True
    return p


def load_partitioner(path: str | Path, *, encoder: Any = None) -> Partitioner:
    """Read a partitioner JSON written by :meth:`Partitioner.save`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"Cannot read the partitioner file {p}: {e}.") from e
    return partitioner_from_dict(d, encoder=encoder, where=str(p))


def tier_table(part: Partitioner) -> list[dict[str, Any]]:
    """One row per training label: label, count, group name (for reports)."""
    return [{"label": lab, "count": part.label_count.get(lab, 0), "group": part.group_names[g]}
            for lab, g in sorted(part.label_group.items(), key=lambda kv: (-part.label_count.get(kv[0], 0), kv[0]))]

