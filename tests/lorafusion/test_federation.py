"""Federated LoRA's aggregation maths against the papers' formulas written here, and its config errors."""

from __future__ import annotations

import pytest
import torch

import lorafusion as lf
from lorafusion.adapter_io import write_peft_adapter
from lorafusion.federation import LORAFAIR_RIDGE, client_weights, fedavg, fedsb_mean, flora_stack, lorafair

N, K = 7, 11


def _clients(ranks: list[int], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(r, K, generator=g, dtype=torch.float64) for r in ranks],
            [torch.randn(N, r, generator=g, dtype=torch.float64) for r in ranks])


def test_fedavg_is_the_weighted_mean_of_each_factor():
    a, b = _clients([3, 3, 3])
    p = [0.5, 0.3, 0.2]
    a_bar, b_bar = fedavg(a, b, p)
    torch.testing.assert_close(a_bar, 0.5 * a[0] + 0.3 * a[1] + 0.2 * a[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(b_bar, 0.5 * b[0] + 0.3 * b[1] + 0.2 * b[2], rtol=0, atol=1e-12)


def test_default_weights_are_sample_counts_and_fedsb_is_unweighted():
    assert client_weights("fedavg", [None, None], [30, 10]) == [0.75, 0.25]
    assert client_weights("flora", [None, None], [30, 10]) == [0.75, 0.25]
    assert client_weights("fedsb", [None, None], [30, 10]) == [0.5, 0.5]
    assert client_weights("fedavg", [1.0, 3.0], [30, 10]) == [0.25, 0.75]


def test_flora_stack_is_the_weighted_sum_of_products_and_independent_of_client_order():
    ranks, scales, p = [2, 3, 5], [2.0, 0.5, 1.5], [0.2, 0.5, 0.3]
    a, b = _clients(ranks)
    stacked_a, stacked_b = flora_stack(a, b, scales, p)
    assert stacked_a.shape == (sum(ranks), K) and stacked_b.shape == (N, sum(ranks))
    ideal = sum(pk * sk * bk @ ak for pk, sk, ak, bk in zip(p, scales, a, b))
    torch.testing.assert_close(stacked_b @ stacked_a, ideal, rtol=0, atol=1e-12)
    order = [2, 0, 1]
    sa, sb = flora_stack(*([x[i] for i in order] for x in (a, b, scales, p)))
    torch.testing.assert_close(sb @ sa, stacked_b @ stacked_a, rtol=0, atol=1e-12)


def test_fedsb_mean_of_r_is_exactly_the_mean_of_the_products():
    g = torch.Generator().manual_seed(1)
    r = 4
    a, b = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)  # shared by every client
    rs = [torch.randn(r, r, generator=g) for _ in range(3)]
    p = client_weights("fedsb", [None] * 3, [5, 6, 7])
    mean_of_products = sum(b @ rk @ a for rk in rs) / 3
    torch.testing.assert_close(b @ fedsb_mean(rs, p) @ a, mean_of_products, rtol=0, atol=1e-5)


def test_lorafair_is_the_least_squares_b_and_never_worse_than_fedavg():
    a, b = _clients([3, 3, 3], seed=2)
    p = [0.2, 0.3, 0.5]
    ideal = sum(pk * bk @ ak for pk, ak, bk in zip(p, a, b))  # Σ p_k B_k A_k
    a_bar = sum(pk * ak for pk, ak in zip(p, a))
    b_bar = sum(pk * bk for pk, bk in zip(p, b))
    fair_a, fair_b = lorafair(a, b, p)
    torch.testing.assert_close(fair_a, a_bar, rtol=0, atol=1e-12)
    least_squares = ideal @ a_bar.t() @ torch.linalg.inv(a_bar @ a_bar.t())  # argmin_B ‖B Ā − ΔW‖
    torch.testing.assert_close(lorafair(a, b, p, ridge=0.0)[1], least_squares, rtol=1e-10, atol=1e-12)
    gram = a_bar @ a_bar.t()  # the ridge on ΔB as documented: λ = LORAFAIR_RIDGE·tr(ĀĀᵀ)/r
    lam = LORAFAIR_RIDGE * torch.trace(gram) / 3 * torch.eye(3, dtype=gram.dtype)
    ridged = b_bar + (ideal - b_bar @ a_bar) @ a_bar.t() @ torch.linalg.inv(gram + lam)
    torch.testing.assert_close(fair_b, ridged, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fair_b, least_squares, rtol=1e-4, atol=1e-6)  # the ridge stays below fp32 precision
    error_fair = torch.linalg.norm(fair_b @ a_bar - ideal)
    error_fedavg = torch.linalg.norm(b_bar @ a_bar - ideal)
    assert error_fair <= error_fedavg and error_fair < 0.9 * error_fedavg


def test_lorafair_of_identical_clients_changes_nothing():
    a, b = _clients([2])
    fair_a, fair_b = lorafair([a[0], a[0]], [b[0], b[0]], [0.4, 0.6])
    torch.testing.assert_close(fair_a, a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fair_b, b[0], rtol=0, atol=1e-9)


def test_flora_stacked_export_loads_in_peft_with_the_dense_logits(train_checkpoint, load_hf_model, tmp_path):
    """Two clients of ranks 2 and 3 (scales 2 and 1): the stack written as a rank-5 LoRA at scale 1 gives, in PEFT,
    the logits of the base model with W + Σ p_k s_k B_k A_k merged in."""
    peft = pytest.importorskip("peft")
    dense = load_hf_model(train_checkpoint)
    config = dense.config
    g = torch.Generator().manual_seed(5)
    ranks, scales, p = [2, 3], [2.0, 1.0], [0.25, 0.75]
    targets = {"q_proj": config.num_attention_heads * (config.hidden_size // config.num_attention_heads),
               "v_proj": config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)}
    tensors = {}
    for index, layer in enumerate(dense.model.layers):
        for target, out in targets.items():
            a = [torch.randn(r, config.hidden_size, generator=g) * 0.1 for r in ranks]
            b = [torch.randn(out, r, generator=g) * 0.1 for r in ranks]
            sa, sb = flora_stack(a, b, scales, p)
            module = f"base_model.model.model.layers.{index}.self_attn.{target}"
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = sa, sb
            with torch.no_grad():
                delta = sum(pk * sk * bk @ ak for pk, sk, ak, bk in zip(p, scales, a, b))
                getattr(layer.self_attn, target).weight += delta
    export = lf.LoRAConfig(rank=sum(ranks), alpha=float(sum(ranks)), target_modules=list(targets))
    write_peft_adapter(tmp_path / "g", tensors, export, base_model=str(train_checkpoint))
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(load_hf_model(train_checkpoint), str(tmp_path / "g")).eval()(ids).logits
        expected = dense(ids).logits
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-5)


def _job(name: str, federation, adapter=None, **kw) -> lf.JobSpec:
    return lf.JobSpec(name=name, dataset="d.jsonl", adapter=adapter or lf.LoRAConfig(rank=4), federation=federation,
                      **kw)


@pytest.mark.parametrize("fields, message", [
    ({"method": "fedprox"},
     r"job 'a': federation.method='fedprox'; choose one of \['fedavg', 'flora', 'fedsb', 'lorafair'\]"),
    ({"aggregate_every_steps": 0}, r"job 'a': federation.aggregate_every_steps=0 must be a positive integer"),
    ({"aggregate_every_steps": -2}, r"federation.aggregate_every_steps=-2 must be a positive integer"),
    ({"aggregate_every_steps": 2.5}, r"federation.aggregate_every_steps=2.5 must be a positive integer"),
    ({"weight": 0}, r"job 'a': federation.weight=0 must be a finite number > 0"),
    ({"weight": float("nan")}, r"federation.weight=nan must be a finite number > 0"),
    ({"weight": "x"}, r"federation.weight='x' must be a finite number > 0"),
    ({"group": "a b"}, r"job 'a': federation.group='a b' is invalid"),
    ({"rounds": 3}, r"job 'a': federation has unknown field\(s\) \['rounds'\]"),
])
def test_each_bad_field_is_named_with_its_value_and_fix(fields, message):
    good = {"group": "g", "aggregate_every_steps": 2}
    with pytest.raises(ValueError, match=message):
        _job("a", {**good, **fields})


def test_federation_needs_group_and_round_length():
    with pytest.raises(ValueError, match=r"job 'a': federation needs group and aggregate_every_steps"):
        _job("a", {"group": "g"})
    with pytest.raises(ValueError, match=r"job 'a': federation=5 must be a mapping"):
        _job("a", 5)


def _check(*jobs):
    from lorafusion.config import check_jobs

    check_jobs(list(jobs))


def test_group_errors_name_the_job_the_field_and_the_fix():
    fed = {"group": "g", "aggregate_every_steps": 2}
    with pytest.raises(ValueError, match=r"job 'a': federation.group='g' has only this one client; a group needs "
                                         r"at least two"):
        _check(_job("a", fed), _job("solo", None))
    with pytest.raises(ValueError, match=r"job 'b': federation.method='flora' but job 'a' of group 'g' has 'fedavg'"):
        _check(_job("a", fed), _job("b", {**fed, "method": "flora"}))
    with pytest.raises(ValueError, match=r"job 'b': federation.aggregate_every_steps=3 but job 'a'"):
        _check(_job("a", fed), _job("b", {**fed, "aggregate_every_steps": 3}))
    with pytest.raises(ValueError, match=r"job 'b': federation.weight=None but other clients of group 'g' give one"):
        _check(_job("a", {**fed, "weight": 2.0}), _job("b", fed))
    with pytest.raises(ValueError, match=r"job 'a': federation.group='g' is also a job's name"):
        _check(_job("a", fed), _job("b", fed), _job("g", None))


def test_incompatible_adapters_are_refused_with_the_difference():
    fed = {"group": "g", "aggregate_every_steps": 2}
    with pytest.raises(ValueError, match=r"job 'b': adapter differs from job 'a' of group 'g' in \['rank'\]"):
        _check(_job("a", fed), _job("b", fed, lf.LoRAConfig(rank=8)))
    with pytest.raises(ValueError, match=r"job 'b': adapter \(lora, \['q_proj'\]\) differs from job 'a'"):
        _check(_job("a", fed), _job("b", fed, lf.LoRAConfig(rank=4, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match=r"job 'a': federation.method='fedavg' aggregates \['lora', 'rslora'\] "
                                         r"adapters, but this job's adapter.type is 'dora'"):
        _check(_job("a", fed, lf.DoRAConfig(rank=4)), _job("b", fed, lf.DoRAConfig(rank=4)))
    with pytest.raises(ValueError, match=r"job 'a': federation.method='fedsb' aggregates \['lorasb'\] adapters"):
        _check(_job("a", {**fed, "method": "fedsb"}), _job("b", {**fed, "method": "fedsb"}))
    sb = {"type": "lorasb", "rank": 4}
    _check(_job("a", {**fed, "method": "fedsb"}, sb), _job("b", {**fed, "method": "fedsb"}, sb))
    with pytest.raises(ValueError, match=r"job 'b': adapter differs from job 'a' of group 'g' in \['init_batches'\]"):
        _check(_job("a", {**fed, "method": "fedsb"}, sb),
               _job("b", {**fed, "method": "fedsb"}, {**sb, "init_batches": 2}))
    flora = {**fed, "method": "flora"}
    _check(_job("a", flora), _job("b", flora, lf.LoRAConfig(rank=8)))  # FLoRA stacks different ranks
    with pytest.raises(ValueError, match=r"job 'a': adapter.dropout=0.05 with federation.method='flora'.*"
                                         r"set adapter.dropout: 0"):
        _check(_job("a", flora, lf.LoRAConfig(rank=4, dropout=0.05)), _job("b", flora))


def test_yaml_federation_is_read_and_checked(tmp_path):
    (tmp_path / "jobs.yaml").write_text(
        "run: {base_model: m, output_dir: out}\n"
        "jobs:\n"
        "  - {name: a, dataset: a.jsonl,\n"
        "     federation: {group: g, aggregate_every_steps: 5, method: lorafair, weight: 2}}\n"
        "  - {name: b, dataset: b.jsonl,\n"
        "     federation: {group: g, aggregate_every_steps: 5, method: lorafair, weight: 1}}\n")
    jobs, _ = lf.load_config(tmp_path / "jobs.yaml")
    assert jobs[0].federation == lf.FederationConfig(group="g", aggregate_every_steps=5, method="lorafair", weight=2)
    assert jobs[0].to_dict()["federation"]["method"] == "lorafair"
    with pytest.raises(ValueError, match=r"job 'a': federation.method='fedx'"):
        lf.load_config(tmp_path / "jobs.yaml", ["jobs.a.federation={group: g, aggregate_every_steps: 5, method: fedx}"])
    jobs, _ = lf.load_config(tmp_path / "jobs.yaml", [f"jobs.{n}.federation.aggregate_every_steps=3" for n in "ab"])
    assert [j.federation.aggregate_every_steps for j in jobs] == [3, 3] and jobs[1].federation.weight == 1
    with pytest.raises(ValueError, match=r"job 'a': federation.method='fedx'"):  # one field of the mapping
        lf.load_config(tmp_path / "jobs.yaml", ["jobs.a.federation.method=fedx"])
