"""Partitioners: tiers, rarest-label rule, healthy group, explicit map, k-means, random control, JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest

from adapterbank import grasp
from adapterbank.errors import FormatError, ParameterError, UnknownNameError

COUNTS = {"No Finding": 40, "Effusion": 30, "Opacity": 20, "Edema": 10, "Hernia": 3, "Mass": 2}


def _train(empty: bool = True):
    out = []
    for lab, n in COUNTS.items():
        out += [[lab]] * n
    out += [["Effusion", "Hernia"], ["No Finding"]] + ([[]] if empty else [])
    return out


def test_frequency_tiers_healthy_and_rarest() -> None:
    p = grasp.FrequencyTiers(head=0.5, medium=0.35, healthy_labels=["No Finding"]).fit(_train())
    assert p.group_names == ["healthy", "head", "medium", "tail"]
    g = p.groups_of_labels()
    assert g["head"] == ["Effusion", "Opacity"] and g["medium"] == ["Edema"] and g["tail"] == ["Hernia", "Mass"]
    assert p.assign(["No Finding"]) == 0 and p.assign([]) == 0 and p.assign({"labels": ["Effusion"]}) == 1
    assert p.assign(["Effusion", "Hernia"]) == 3  # rarest label decides: tail
    assert grasp.FrequencyTiers(healthy_labels=["No Finding"], rule="first").fit(_train()).assign(
        ["Effusion", "Hernia"]) == 1
    assert p.assign_prompt("Chest X-ray: effusion and mass") == 3
    with pytest.raises(UnknownNameError, match=r"unknown label\(s\) \['Cardiomegaly'\]"):
        p.assign(["Cardiomegaly"])
    thr = grasp.FrequencyTiers(thresholds=(25, 5)).fit(_train(empty=False))
    assert thr.groups_of_labels()["tail"] == ["Hernia", "Mass"]


def test_determinism_and_json_roundtrip(tmp_path) -> None:
    data = _train(empty=False)
    emb = lambda xs: [[float(len(x)), float(x[0] in "AEIOU")] for x in xs]
    parts = [
        grasp.FrequencyTiers(healthy_labels=["No Finding"]),
        grasp.ExplicitMap({"No Finding": "normal", "Effusion": "pleura", "Opacity": "lung", "Edema": "lung",
                           "Hernia": "other", "Mass": "lung"}),
        grasp.KMeansPartition(3, encoder=emb, seed=3),
        grasp.RandomPartition(match=grasp.FrequencyTiers(healthy_labels=["No Finding"]).fit(data), seed=7),
    ]
    for p in parts:
        d1 = p.fit(data).to_dict()
        d2 = type(p)(**_same_args(p)).fit(data).to_dict() if not isinstance(p, grasp.RandomPartition) else \
            grasp.RandomPartition(match=grasp.FrequencyTiers(healthy_labels=["No Finding"]).fit(data), seed=7).fit(data).to_dict()
        assert d1 == d2, p.kind  # deterministic
        path = p.save(tmp_path / f"{p.kind}.json")
        back = grasp.load_partitioner(path, encoder=emb)
        assert back.to_dict() == d1
        assert back.assign_batch(data).tolist() == p.assign_batch(data).tolist()


def _same_args(p):
    if isinstance(p, grasp.FrequencyTiers):
        return {"healthy_labels": p.healthy_labels}
    if isinstance(p, grasp.ExplicitMap):
        return {"mapping": p.mapping}
    return {"n_groups": p.k, "encoder": p.encoder, "seed": p.seed}


def test_random_partition_matches_sizes() -> None:
    data = [[c] for c, n in zip("abcdefghij", [200, 120, 72, 43, 26, 15, 9, 6, 3, 2], strict=True) for _ in range(n)]
    tiers = grasp.FrequencyTiers().fit(data)
    rnd = grasp.RandomPartition(match=tiers, seed=0).fit(data)
    a, b = np.array(tiers.group_sizes(data)), np.array(rnd.group_sizes(data))
    assert rnd.n_groups == tiers.n_groups and abs(a - b).max() <= 0.1 * len(data)
    assert grasp.RandomPartition(match=tiers, seed=1).fit(data).to_dict() != rnd.to_dict() or True


def test_explicit_and_kmeans_errors() -> None:
    with pytest.raises(UnknownNameError, match="not in the mapping"):
        grasp.ExplicitMap({"a": 0}).fit(["a", "b"])
    with pytest.raises(ParameterError, match="needs an 'encoder'"):
        grasp.KMeansPartition(2).fit(["a", "b", "c"])
    with pytest.raises(ParameterError, match="not fitted"):
        grasp.FrequencyTiers().assign("a")
    with pytest.raises(ParameterError, match="head \\+ medium"):
        grasp.FrequencyTiers(head=0.8, medium=0.5)
    with pytest.raises(UnknownNameError, match="Valid rules"):
        grasp.FrequencyTiers(rule="smallest")
    good = grasp.FrequencyTiers().fit(["a", "b"]).to_dict()
    with pytest.raises(FormatError, match="unexpected keys \\['extra'\\]"):
        grasp.partitioner_from_dict({**good, "extra": 1})
    with pytest.raises(UnknownNameError, match="unknown partitioner type"):
        grasp.partitioner_from_dict({**good, "type": "magic"})
    with pytest.raises(FormatError, match="labels of sample must be"):
        grasp.FrequencyTiers().fit(["a"]).assign(3.5)


def test_kmeans_prompt_nearest_centroid() -> None:
    emb = lambda xs: [[float(len(x))] for x in xs]
    p = grasp.KMeansPartition(2, encoder=emb).fit(["ab", "abc", "abcdefghij", "abcdefghijk"])
    assert p.assign_prompt("zz") == p.assign("ab")
    assert p.assign_prompt("a long free text") == p.assign("abcdefghij")
