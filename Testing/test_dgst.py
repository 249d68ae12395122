"""The DGST sparse-update engine: policies, the bitwise-masked optimiser step, statistics, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dgst_helpers import (GAMMA, INPUT_SHAPE, changed_mask, output_filters, random_batch, record_plans, segmentation_loss, sgd, tiny_unet, train, union_of)
from LymphNodeDGSTLib.adaptation import dgst
from LymphNodeDGSTLib.adaptation.dgst import lora as dgst_lora
from LymphNodeDGSTLib.adaptation.dgst import masked_step as dgst_step
from LymphNodeDGSTLib.adaptation.dgst import policies as dgst_policies
from LymphNodeDGSTLib.adaptation.dgst import selection as dgst_selection
from LymphNodeDGSTLib.adaptation.weight_stats import count_changed, weight_change_summary
from LymphNodeDGSTLib.engine.store.state_dicts import snapshot_state


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from threads, and OpenMP barriers stall (hundreds of ms per
    step, measured) when other processes keep the cores busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Selection

def brute_force_top(scores: torch.Tensor, gamma: int) -> torch.Tensor:
    """Reference: per row, sort (score descending, index ascending) and keep the first gamma."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(scores.shape[0]):
        values = scores[row].tolist()
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))
        mask[row, order[:gamma]] = True
    return mask


@pytest.mark.parametrize("shape,gamma,with_ties", [
    ((7, 30), 2, False), ((7, 30), 1, False), ((5, 27), 3, True), ((4, 12), 5, True),
    ((6, 4), 4, True), ((6, 3), 10, False), ((3, 50), 2, True),
    ((5, 40), 12, True), ((4, 30), 9, False),  # above ITERATIVE_MAX_LIMIT: the topk path
])
def test_top_gamma_mask_matches_brute_force(shape, gamma, with_ties):
    generator = torch.Generator().manual_seed(sum(shape) + gamma)
    if with_ties:  # few distinct values: many ties, also at the threshold
        scores = torch.randint(0, 3, shape, generator=generator).float()
    else:
        scores = torch.randn(shape, generator=generator).abs()
    original = scores.clone()
    mask = dgst_selection.top_gamma_mask(scores, gamma)
    assert torch.equal(scores, original), "scores must be left alone unless overwrite_scores"
    assert torch.equal(mask, brute_force_top(scores, gamma))
    assert (mask.sum(dim=1) == min(gamma, shape[1])).all()
    assert torch.equal(dgst_selection.top_gamma_mask(scores.clone(), gamma, overwrite_scores=True), mask)


@pytest.mark.parametrize("gamma", [2, 10])
def test_top_gamma_mask_selects_nan_first(gamma):
    scores = torch.rand(4, 30, generator=torch.Generator().manual_seed(gamma))
    scores[0, 5] = scores[0, 20] = scores[2, 7] = float("nan")
    mask = dgst_selection.top_gamma_mask(scores, gamma)
    assert mask[0, 5] and mask[0, 20] and mask[2, 7]
    assert torch.equal(mask, brute_force_top(scores.nan_to_num(nan=2.0), gamma))


def test_top_gamma_mask_all_equal_scores_take_lowest_indices():
    mask = dgst_selection.top_gamma_mask(torch.zeros(3, 10), 2)
    assert mask[:, :2].all() and not mask[:, 2:].any()


def test_filter_layout_uses_output_filters_for_transposed_and_grouped_convolutions():
    conv = nn.Conv3d(6, 4, 3, groups=2)
    layout = dgst_selection.FilterLayout.of(conv)
    assert (layout.n_filters, layout.filter_size) == (4, 3 * 27)
    assert torch.equal(layout.to_filters(conv.weight)[1], conv.weight[1].flatten())

    transposed = nn.ConvTranspose3d(6, 4, 2, stride=2, groups=2)  # weight [6, 2, 2, 2, 2]
    layout = dgst_selection.FilterLayout.of(transposed)
    assert (layout.n_filters, layout.filter_size) == (4, 3 * 8)
    filters = layout.to_filters(transposed.weight)
    for out_channel in range(4):
        group, within = divmod(out_channel, 2)
        expected = transposed.weight[3 * group:3 * (group + 1), within].flatten()
        assert torch.equal(filters[out_channel], expected)
    assert torch.equal(layout.from_filters(filters), transposed.weight)


# ---------------------------------------------------------------------------------------------
# Policies: exactly the allowed entries change

def test_plain_conv_unet_has_transposed_convolutions_in_the_sparse_set():
    policy = dgst.make_policy("dgst", tiny_unet())
    transposed = [info for info in policy.sparse if info.layout.transposed]
    assert transposed and all(info.name.startswith("decoder.transpconvs") for info in transposed)
    assert any(info.in_seg_layers for info in policy.always)
    assert not any(info.in_seg_layers for info in policy.sparse)


@pytest.mark.parametrize("name", dgst.SPARSE_POLICY_NAMES)
def test_sparse_policies_change_exactly_the_selected_entries(name):
    """Exactness for the paper's dgst and every project variant (ema, split, budget)."""
    network = tiny_unet()
    foundation = {n: p.detach().clone() for n, p in network.named_parameters()}
    policy = dgst.make_policy(name, network, gamma=GAMMA, seed=1, warmup_steps=2)
    recorded = record_plans(policy)
    steps = 6
    _, reports = train(network, policy, steps)

    for info in policy.infos:
        changed = changed_mask(foundation[info.name], info.parameter)
        union = union_of(recorded, info.parameter)
        assert not (changed & ~union).any(), f"{info.name}: an entry outside the allowed set changed"
        if info.layout is not None and not info.always_trained:
            assert torch.equal(changed, union), f"{info.name}: a selected entry did not move"
            transposed = isinstance(network.get_submodule(info.name.rpartition(".")[0]),
                                    nn.ConvTranspose3d)
            per_filter = output_filters(changed, transposed).sum(dim=1)
            assert int(per_filter.max()) <= GAMMA * steps
            for allowed in recorded:  # every step: exactly gamma entries in every output filter
                if id(info.parameter) in allowed:
                    counts = output_filters(allowed[id(info.parameter)], transposed).sum(dim=1)
                    assert (counts == GAMMA).all()
        if info.is_norm or info.in_seg_layers:
            assert changed.any(), f"{info.name}: always-trained but unchanged"

    expected_counts = [sum(int(mask.sum()) for mask in allowed.values()) for allowed in recorded]
    assert [report.entries_updated for report in reports] == expected_counts


def test_static_policy_moves_no_convolution_during_warm_up_then_keeps_its_selection():
    network = tiny_unet()
    policy = dgst.make_policy("static", network, gamma=GAMMA, warmup_steps=3)
    recorded = record_plans(policy)
    _, reports = train(network, policy, 6)
    sparse_ids = {id(info.parameter) for info in policy.sparse}
    for allowed in recorded[:3]:
        assert not sparse_ids & set(allowed)
    assert all(report.sparse_entries == 0 for report in reports[:3])
    for parameter_id in sparse_ids:
        masks = [allowed[parameter_id] for allowed in recorded[3:]]
        assert all(torch.equal(masks[0], mask) for mask in masks[1:])


def test_random_policy_redraws_every_step_and_is_seeded():
    def masks_for(seed: int) -> list[torch.Tensor]:
        network = tiny_unet()
        policy = dgst.make_policy("random", network, gamma=GAMMA, seed=seed)
        recorded = record_plans(policy)
        train(network, policy, 3)
        weight = policy.sparse[2].parameter
        return [allowed[id(weight)] for allowed in recorded]

    first, again, other = masks_for(5), masks_for(5), masks_for(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("name", ["bias", "norm", "full"])
def test_whole_tensor_policies(name):
    network = tiny_unet()
    foundation = {n: p.detach().clone() for n, p in network.named_parameters()}
    policy = dgst.make_policy(name, network)
    recorded = record_plans(policy)
    train(network, policy, 3)
    for info in policy.infos:
        changed = changed_mask(foundation[info.name], info.parameter)
        assert not (changed & ~union_of(recorded, info.parameter)).any()
        is_conv_weight = info.layout is not None and not info.in_seg_layers
        if is_conv_weight and name != "full":
            assert not changed.any(), f"{name} changed convolution weight {info.name}"
        if is_conv_weight and name == "full":
            assert changed.float().mean() > 0.99
        if info.in_seg_layers:
            assert changed.any()
    if name in ("bias", "norm"):
        frozen = [p for p in network.parameters() if not p.requires_grad]
        assert frozen, "untrained parameters should not need gradients"


def test_make_policy_rejects_unknown_names_and_bad_gamma():
    with pytest.raises(ValueError):
        dgst.make_policy("dgts", tiny_unet())
    with pytest.raises(ValueError):
        dgst.make_policy("dgst", tiny_unet(), gamma=0)
    assert set(dgst.POLICY_NAMES) == {"dgst", "full", "bias", "norm", "lora", "random", "static",
                                      "dgst-ema", "dgst-split", "dgst-budget"}
    with pytest.raises(ValueError, match="selection-only"):
        dgst.make_policy("norm", tiny_unet(), selection_only=True)


def test_policy_state_round_trip_restores_static_selection_and_random_stream():
    network = tiny_unet()
    static = dgst.make_policy("static", network, warmup_steps=2)
    train(network, static, 3)
    restored = dgst.make_policy("static", network, warmup_steps=2)
    restored.load_state_dict(static.state_dict())
    assert restored.fixed_masks.keys() == static.fixed_masks.keys()
    assert all(torch.equal(restored.fixed_masks[k], static.fixed_masks[k]) for k in static.fixed_masks)

    network = tiny_unet()
    random_policy = dgst.make_policy("random", network, seed=3)
    train(network, random_policy, 1)
    twin = dgst.make_policy("random", network, seed=99)
    twin.load_state_dict(random_policy.state_dict())
    image, target = random_batch(0)
    segmentation_loss(network(image), target).backward()
    masks = [mask for _, mask in random_policy.select()]
    twin_masks = [mask for _, mask in twin.select()]
    assert all(torch.equal(a, b) for a, b in zip(masks, twin_masks))


# ---------------------------------------------------------------------------------------------
# The masked step: update masking vs. gradient-only masking

OPTIMISERS = {
    "sgd_nesterov": lambda params: sgd(params),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=3e-5),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=3e-5),
}


def gradient_only_masked_step(policy: dgst_policies.UpdatePolicy, optimizer) -> dgst_policies.StepPlan:
    """What defect 2 of DGST.md does: zero the unselected gradients, then a plain step."""
    plan = policy.plan()
    for p, mask, _ in plan.masked:
        p.grad.masked_fill_(~mask, 0)
    optimizer.step()
    return plan


@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
def test_update_masking_keeps_unselected_entries_where_gradient_masking_does_not(optimiser):
    outcomes = {}
    for implementation in ("gradient_only", "masked_stepper"):
        network = tiny_unet()
        policy = dgst.make_policy("dgst", network, gamma=GAMMA)
        optimizer = OPTIMISERS[optimiser](policy.trainable_parameters())
        stepper = dgst_step.MaskedStepper(policy)
        recorded = record_plans(policy) if implementation == "masked_stepper" else []
        escaped = 0
        for step in range(4):
            image, target = random_batch(step)
            optimizer.zero_grad(set_to_none=True)
            segmentation_loss(network(image), target).backward()
            before = {id(info.parameter): info.parameter.detach().clone() for info in policy.sparse}
            if implementation == "gradient_only":
                plan = gradient_only_masked_step(policy, optimizer)
                masks = {id(p): mask for p, mask, _ in plan.masked}
            else:
                stepper.step(optimizer)
                masks = recorded[-1]
            for info in policy.sparse:
                moved = changed_mask(before[id(info.parameter)], info.parameter)
                escaped += int((moved & ~masks[id(info.parameter)]).sum())
        outcomes[implementation] = escaped
    assert outcomes["gradient_only"] > 1000, "the naive implementation should leak updates"
    assert outcomes["masked_stepper"] == 0


def test_clipping_uses_only_the_applied_gradients():
    network = tiny_unet()
    policy = dgst.make_policy("dgst", network, gamma=GAMMA)
    recorded = record_plans(policy)
    optimizer = sgd(policy.trainable_parameters())
    stepper = dgst_step.MaskedStepper(policy, max_grad_norm=1e-3)
    image, target = random_batch(0)
    segmentation_loss(network(image), target).backward()
    gradients = {id(p): p.grad.clone() for p in network.parameters() if p.grad is not None}
    report = stepper.step(optimizer)
    allowed = recorded[0]
    applied_norm = torch.sqrt(sum((gradients[i][mask] ** 2).sum() for i, mask in allowed.items()))
    full_norm = torch.sqrt(sum((g ** 2).sum() for g in gradients.values()))
    assert report.grad_norm == pytest.approx(float(applied_norm), rel=1e-5)
    assert report.grad_norm < 0.9 * float(full_norm)


def test_foundation_l2_pulls_only_allowed_entries_back():
    network = tiny_unet()
    policy = dgst.make_policy("dgst", network, gamma=GAMMA)
    recorded = record_plans(policy)
    stepper = dgst_step.MaskedStepper(policy, foundation_l2=0.5)
    foundation = {id(p): p.detach().clone() for p in policy.trainable_parameters()}
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1.0)
    displaced = {id(p): p.detach().clone() for p in policy.trainable_parameters()}
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    image, _ = random_batch(0)
    (0.0 * sum(output.sum() for output in network(image))).backward()  # zero task gradient
    stepper.step(optimizer)
    for p in policy.trainable_parameters():
        allowed = recorded[0][id(p)]
        expected = displaced[id(p)] - 0.1 * 0.5 * (displaced[id(p)] - foundation[id(p)])
        assert torch.allclose(p[allowed], expected[allowed])
        assert torch.equal(p[~allowed], displaced[id(p)][~allowed])


def test_grad_scaler_step_and_skipped_step():
    network = tiny_unet()
    policy = dgst.make_policy("dgst", network, gamma=GAMMA)
    optimizer = sgd(policy.trainable_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    stepper = dgst_step.MaskedStepper(policy, max_grad_norm=12.0)
    image, target = random_batch(0)
    foundation = {n: p.detach().clone() for n, p in network.named_parameters()}

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(segmentation_loss(network(image), target)).backward()
    first = next(network.parameters())
    first.grad[0, 0, 0, 0, 0] = float("inf")
    skipped = stepper.step(optimizer, scaler)  # unscales by itself
    scaler.update()
    assert not skipped.stepped and skipped.entries_updated == 0
    assert all(torch.equal(foundation[n], p) for n, p in network.named_parameters())

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(segmentation_loss(network(image), target)).backward()
    scaler.unscale_(optimizer)  # the caller may unscale first, as nnU-Net does before clipping
    applied = stepper.step(optimizer, scaler)
    scaler.update()
    assert applied.stepped and applied.entries_updated == policy.max_entries_per_step()
    assert stepper.steps == 2 and stepper.steps_applied == 1
    assert stepper.entries_history == [0, applied.entries_updated]


def test_dgst_with_momentum_lowers_the_loss_on_a_toy_segmentation_task():
    network = tiny_unet(deep_supervision=False)
    policy = dgst.make_policy("dgst", network, gamma=GAMMA)
    optimizer = sgd(policy.trainable_parameters(), lr=1e-2)
    stepper = dgst_step.MaskedStepper(policy, max_grad_norm=12.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):  # a bright box in noise; the label is the box
        image = torch.randn(INPUT_SHAPE, generator=generator) * 0.3
        target = torch.zeros((INPUT_SHAPE[0],) + INPUT_SHAPE[2:], dtype=torch.long)
        for b in range(INPUT_SHAPE[0]):
            y, x = torch.randint(0, 9, (2,), generator=generator).tolist()
            target[b, :, y:y + 7, x:x + 7] = 1
        image[:, 0] += 2.0 * target
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(network(image), target)
        loss.backward()
        stepper.step(optimizer)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"
    summary = stepper.summary()
    json.dumps(summary)
    # deep supervision off: only the last seg layer gets gradients, so fewer than the maximum move
    assert 0 < summary["entries_updated_per_step_mean"] < policy.max_entries_per_step()
    assert summary["share_updated_per_step_mean"] < 0.2


# ---------------------------------------------------------------------------------------------
# LoRA

def test_lora_trains_adapters_only_and_merges_into_plain_weights():
    network = tiny_unet()
    original_keys = list(network.state_dict())
    foundation = {n: p.detach().clone() for n, p in network.named_parameters()}
    policy = dgst.make_policy("lora", network, lora_rank=4)
    lora_b = [p for n, p in network.named_parameters() if ".lora_B." in n]
    adapted_convs = [name for name, m in tiny_unet().named_modules()
                     if isinstance(m, nn.modules.conv._ConvNd) and "seg_layers" not in name]
    assert len(lora_b) == len(adapted_convs)
    train(network, policy, 3, optimizer=torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2))
    assert all(p.abs().sum() > 0 for p in lora_b), "every adapter must be in the forward path"
    for name, parameter in network.named_parameters():
        if name.endswith("base_layer.weight"):
            assert torch.equal(parameter, foundation[name.replace("base_layer.", "")])

    network.eval()
    image, _ = random_batch(7)
    with torch.no_grad():
        peft_outputs = network(image)
        merged = dgst_lora.merged_state_dict(network)
        plain = tiny_unet()
        plain.load_state_dict(merged)
        plain.eval()
        plain_outputs = plain(image)
    assert list(merged) == original_keys
    for peft_output, plain_output in zip(peft_outputs, plain_outputs):
        assert torch.allclose(peft_output, plain_output, atol=1e-4, rtol=1e-4)
    assert not any("lora" in type(m).__module__ for m in plain.modules())


# ---------------------------------------------------------------------------------------------
# Statistics

def test_weight_change_summary_counts_bitwise_differences_once_per_tensor():
    network = tiny_unet()
    foundation = snapshot_state(network.state_dict())
    with torch.no_grad():
        network.decoder.seg_layers[0].bias.add_(1.0)           # 2 entries
        network.encoder.stages[0][0].convs[0].conv.weight[0, 0, 0, 0, 0] += 1.0  # 1 entry
    summary = weight_change_summary(foundation, network.state_dict())
    json.dumps(summary)
    assert summary["total"]["changed"] == 3
    assert summary["total"]["entries"] == sum(p.numel() for p in network.parameters())
    layer = summary["layers"]["encoder.stages.0.0.convs.0.conv.weight"]
    assert layer["changed"] == 1 and "encoder.stages.0.0.convs.0.all_modules.0.weight" not in summary["layers"]
    assert count_changed(torch.tensor([0.0]), torch.tensor([-0.0])) == 1
    assert count_changed(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == 0
    with pytest.raises(ValueError):
        weight_change_summary(foundation, {})


def test_dgst_changes_a_small_share_of_the_weights():
    network = tiny_unet()
    foundation = snapshot_state(network.state_dict())
    policy = dgst.make_policy("dgst", network, gamma=1)
    train(network, policy, 2)
    summary = weight_change_summary(foundation, network.state_dict())
    sparse_names = {info.name for info in policy.sparse}
    conv_changed = sum(v["changed"] for k, v in summary["layers"].items() if k in sparse_names)
    conv_entries = sum(v["entries"] for k, v in summary["layers"].items() if k in sparse_names)
    filters = sum(info.layout.n_filters for info in policy.sparse)
    assert filters <= conv_changed <= 2 * filters
    assert conv_changed / conv_entries < 0.05
