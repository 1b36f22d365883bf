"""Aggregation and admission as pure functions: FedAvg, robust means, LoRA products, DP, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetune.federated.admission import AdmissionPolicy, StoreSpec, UpdateRefused, admit, bound_norm, check_tensors
from edgetune.federated.aggregate import AggregationOptions, ClientUpdate, aggregate, lora_pairs, space_for
from edgetune.federated.privacy import DPOptions, epsilon

A_KEY, B_KEY = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"
BIAS = "m.layers.0.extra"  # a tensor that is not part of a LoRA pair
RANK, IN, OUT = 2, 6, 5


def _adapter(rng, scale=1.0) -> dict[str, np.ndarray]:
    return {A_KEY: rng.normal(size=(RANK, IN)).astype(np.float32) * scale,
            B_KEY: rng.normal(size=(OUT, RANK)).astype(np.float32) * scale,
            BIAS: rng.normal(size=(3,)).astype(np.float32) * scale}


def _updates(rng, start, n=5, change_a=True) -> list[ClientUpdate]:
    out = []
    for i in range(n):
        step = _adapter(rng, 0.1)
        if not change_a:
            step[A_KEY] = np.zeros_like(step[A_KEY])
        out.append(ClientUpdate({k: start[k] + step[k] for k in start}, start, weight=float(10 + 7 * i)))
    return out


def test_fedavg_tensor_space_is_the_weighted_mean_of_adapters():
    rng = np.random.default_rng(0)
    start = _adapter(rng)
    ups = _updates(rng, start)
    result = aggregate(start, ups, AggregationOptions("fedavg", space="tensor"))
    w = np.array([u.weight for u in ups]) / sum(u.weight for u in ups)
    for k in start:
        by_hand = sum(wi * u.adapter[k].astype(np.float64) for wi, u in zip(w, ups))
        np.testing.assert_allclose(result.tensors[k], by_hand, rtol=1e-5, atol=1e-6)
        assert result.tensors[k].dtype == np.float32
    assert result.report["updates"] == 5


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregators_ignore_an_outlier(aggregator):
    rng = np.random.default_rng(1)
    start = _adapter(rng)
    ups = _updates(rng, start, n=7)
    ups[3] = ClientUpdate({k: start[k] + 1e6 for k in start}, start, weight=1e9)  # a poisoned update
    result = aggregate(start, ups, AggregationOptions(aggregator, trim=0.2, space="tensor"))
    honest = np.stack([u.adapter[BIAS] for i, u in enumerate(ups) if i != 3])
    assert np.all(result.tensors[BIAS] >= honest.min(axis=0) - 1e-6)
    assert np.all(result.tensors[BIAS] <= honest.max(axis=0) + 1e-6)
    stack = np.sort(np.stack([u.adapter[BIAS].astype(np.float64) for u in ups]), axis=0)
    by_hand = np.median(stack, axis=0) if aggregator == "median" else stack[1:6].mean(axis=0)  # floor(0.2*7)=1 cut
    np.testing.assert_allclose(result.tensors[BIAS], by_hand, rtol=1e-5, atol=1e-6)


def test_lora_product_is_the_best_rank_r_fit_of_the_mean_product():
    rng = np.random.default_rng(2)
    start = _adapter(rng)
    ups = _updates(rng, start)
    result = aggregate(start, ups, AggregationOptions("fedavg", space="lora-product", rank=RANK))
    w = np.array([u.weight for u in ups]) / sum(u.weight for u in ups)
    mean_product = sum(wi * (u.adapter[B_KEY].astype(np.float64) @ u.adapter[A_KEY]) for wi, u in zip(w, ups))
    u_, s, vt = np.linalg.svd(mean_product)
    best = (u_[:, :RANK] * s[:RANK]) @ vt[:RANK]
    got = result.tensors[B_KEY].astype(np.float64) @ result.tensors[A_KEY]
    np.testing.assert_allclose(got, best, atol=1e-5)
    energy = result.report["discarded_energy"]["m.layers.0.q_proj"]
    assert energy == pytest.approx(float(np.sum(s[RANK:] ** 2) / np.sum(s ** 2)), rel=1e-6)
    assert energy > 0  # 5 devices' rank-2 products do not fit in rank 2
    # averaging A and B separately is not the mean product: the reason for this space
    naive = (sum(wi * u.adapter[B_KEY] for wi, u in zip(w, ups)) @ sum(wi * u.adapter[A_KEY] for wi, u in zip(w, ups)))
    assert np.linalg.norm(naive - mean_product) > 10 * np.linalg.norm(got - best) + 1e-3
    np.testing.assert_allclose(result.tensors[BIAS], sum(wi * u.adapter[BIAS] for wi, u in zip(w, ups)), atol=1e-5)
    # A keeps the current global's scale (mean row norm)
    assert np.linalg.norm(result.tensors[A_KEY], axis=1).mean() == pytest.approx(
        np.linalg.norm(start[A_KEY], axis=1).mean(), rel=1e-5)


def test_frozen_a_is_exact_in_both_spaces():
    rng = np.random.default_rng(3)
    start = _adapter(rng)
    ups = _updates(rng, start, change_a=False)
    w = np.array([u.weight for u in ups]) / sum(u.weight for u in ups)
    mean_b = sum(wi * u.adapter[B_KEY].astype(np.float64) for wi, u in zip(w, ups))
    tensor = aggregate(start, ups, AggregationOptions("fedavg", space="tensor"))
    np.testing.assert_allclose(tensor.tensors[B_KEY], mean_b, atol=1e-6)
    np.testing.assert_array_equal(tensor.tensors[A_KEY], start[A_KEY])
    product = aggregate(start, ups, AggregationOptions("fedavg", space="lora-product", rank=RANK))
    np.testing.assert_allclose(product.tensors[B_KEY].astype(np.float64) @ product.tensors[A_KEY],
                               mean_b @ start[A_KEY], atol=1e-5)
    assert product.report["discarded_energy_max"] < 1e-10


def test_space_follows_the_method():
    layout = {A_KEY: (RANK, IN), B_KEY: (OUT, RANK)}
    assert lora_pairs(layout) == {"m.layers.0.q_proj": (A_KEY, B_KEY)}
    assert space_for({"name": "lora", "config": {"rank": 2}}, layout) == "lora-product"
    assert space_for({"name": "lora", "config": {"rank": 2, "freeze_a": True}}, layout) == "tensor"
    assert space_for({"name": "lora", "config": {"rank": 2}}, {B_KEY: (OUT, RANK)}) == "tensor"


def test_late_update_moves_the_global_by_its_own_change():
    rng = np.random.default_rng(4)
    old, current = _adapter(rng), _adapter(rng)
    late = ClientUpdate({k: old[k] + 0.5 for k in old}, old, weight=1.0)
    result = aggregate(current, [late], AggregationOptions("fedavg", space="tensor"))
    np.testing.assert_allclose(result.tensors[BIAS], current[BIAS] + 0.5, atol=1e-6)


def test_dp_mean_is_clipped_mean_plus_the_seeded_noise():
    rng = np.random.default_rng(5)
    start = _adapter(rng)
    ups = _updates(rng, start)
    ups[0] = ClientUpdate({k: start[k] + 100.0 for k in start}, start, 1.0)  # clipped to norm C
    dp = DPOptions(noise_multiplier=0.7, clip=0.5)
    result = aggregate(start, ups, AggregationOptions("fedavg", space="tensor", dp=dp), rng=np.random.default_rng(9))
    noise_rng = np.random.default_rng(9)
    for k in start:  # private_mean draws the noise tensor by tensor in layout order
        changes = []
        for u in ups:
            change = {j: u.adapter[j].astype(np.float64) - start[j] for j in start}
            norm = math.sqrt(sum(float(np.sum(c ** 2)) for c in change.values()))
            changes.append(change[k] * min(1.0, 0.5 / norm))
        noise = noise_rng.normal(0.0, 0.7 * 0.5, size=start[k].shape)
        np.testing.assert_allclose(result.tensors[k], start[k] + (np.sum(changes, axis=0) + noise) / 5, atol=1e-5)
    assert result.report["dp"]["clipped_updates"] >= 1
    assert result.report["dp"]["epsilon_round"] == pytest.approx(epsilon(0.7, 1, 1e-5))


@pytest.mark.parametrize("z", [0.8, 1.0, 2.0, 5.0])
def test_zcdp_epsilon_is_a_valid_bound_for_the_gaussian_mechanism(z):
    """The exact privacy curve of the Gaussian mechanism (Balle & Wang 2018, Thm. 8) at our epsilon
    must give a delta no larger than the one we claim: the zCDP conversion is an upper bound."""
    target = 1e-5
    eps = epsilon(z, 1, target)
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    exact_delta = phi(1 / (2 * z) - eps * z) - math.exp(eps) * phi(-1 / (2 * z) - eps * z)
    assert exact_delta <= target
    assert epsilon(z, 4, target) > epsilon(z, 1, target)  # rounds compose


def test_options_refuse_bad_values_in_one_message():
    with pytest.raises(Exception) as info:
        AggregationOptions("mean", trim=0.7, space="lora-product", rank=0)
    assert "--aggregator" in str(info.value) and "--trim" in str(info.value) and "rank" in str(info.value)
    with pytest.raises(Exception, match="--max-norm"):
        AdmissionPolicy(max_norm=-1)


def test_norm_policies():
    start = {BIAS: np.zeros(3, np.float32)}
    big = {BIAS: np.array([3.0, 4.0, 0.0], np.float32)}  # change norm 5
    with pytest.raises(UpdateRefused) as info:
        bound_norm(big, start, AdmissionPolicy(max_norm=1.0, norm_policy="refuse"))
    assert (info.value.status, info.value.reason) == (422, "norm_too_large")
    clipped, norm, was = bound_norm(big, start, AdmissionPolicy(max_norm=1.0, norm_policy="clip"))
    assert norm == pytest.approx(5.0) and was
    np.testing.assert_allclose(clipped[BIAS], [0.6, 0.8, 0.0], atol=1e-6)


def test_check_tensors_lists_every_problem():
    spec = StoreSpec("0" * 64, {"name": "lora", "config": {}}, {A_KEY: (RANK, IN), B_KEY: (OUT, RANK)})
    with pytest.raises(UpdateRefused) as info:
        check_tensors({A_KEY: np.zeros((RANK, IN + 1)), "x": np.zeros(1)}, spec)
    assert info.value.status == 422 and "missing" in str(info.value) and "unexpected" in str(info.value)
    with pytest.raises(UpdateRefused, match="NaN"):
        check_tensors({A_KEY: np.full((RANK, IN), np.nan), B_KEY: np.zeros((OUT, RANK))}, spec)


def test_admit_a_delta_and_refuse_a_stale_one():
    from edgetune.delta import encode_delta

    rng = np.random.default_rng(6)
    start = _adapter(rng)
    layout = {k: v.shape for k, v in start.items()}
    method = {"name": "lora", "config": {"rank": RANK}}
    spec = StoreSpec("a" * 64, method, layout)
    body = encode_delta({k: v + 0.01 for k, v in start.items()}, base_model_sha256="a" * 64, method=method,
                        codec="fp32", num_examples=12, metrics={"loss": 1.5}, round_id="3")
    got = admit(body, claimed_round=3, current_round=3, spec=spec, policy=AdmissionPolicy(),
                global_of=lambda n: (start, "b" * 64))
    assert got.update.weight == 12 and got.loss == 1.5 and got.lateness == 0
    late = admit(body, claimed_round=3, current_round=4, spec=spec, policy=AdmissionPolicy(max_late=1, late_discount=0.5),
                 global_of=lambda n: (start, "b" * 64))
    assert late.update.weight == 6 and late.lateness == 1
    for current, status in ((5, 410), (2, 409)):
        with pytest.raises(UpdateRefused) as info:
            admit(body, claimed_round=3, current_round=current, spec=spec, policy=AdmissionPolicy(max_late=1),
                  global_of=lambda n: (start, "b" * 64))
        assert info.value.status == status
    with pytest.raises(UpdateRefused) as info:
        admit(body, claimed_round=4, current_round=4, spec=spec, policy=AdmissionPolicy(),
              global_of=lambda n: (start, "b" * 64))
    assert info.value.reason == "round_mismatch"
