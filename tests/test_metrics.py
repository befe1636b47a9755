"""vitlab.metrics against values computed by hand: mIoU / pixel accuracy (PyTorch-Encoding), FB-IoU and fold mIoU
(HSNet), R@k / MdR / MnR with ties (MMT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.metrics import FoldMeter, SegmentationMeter, fb_iou, fold_metrics, retrieval_metrics, segmentation_metrics

# ---------------------------------------------------------------------------------------------------- segmentation

# A 2x3 map with classes 0..2; with num_classes=4, class 3 is absent from both prediction and target.
TARGET_A = np.array([[0, 0, 1], [1, 2, 2]])
PRED_A = np.array([[0, 1, 1], [1, 2, 0]])
# confusion (rows target, cols pred): [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
# class 0: inter 1, pred 2, target 2 -> union 3 -> 1/3
# class 1: inter 2, pred 3, target 2 -> union 3 -> 2/3
# class 2: inter 1, pred 1, target 2 -> union 2 -> 1/2
# class 3: union 0 -> 0 (PyTorch-Encoding: 0 / (eps + 0)), and it counts in the mean
# correct 4 of 6 labelled pixels


def test_hand_made_map_absent_class_counts_as_zero():
    r = segmentation_metrics(PRED_A, TARGET_A, num_classes=4)
    assert r["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2, 0.0])
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 0) / 4)  # 0.375, not 0.5 (torchmetrics' macro mean)
    assert r["pixel_accuracy"] == pytest.approx(4 / 6)
    assert segmentation_metrics(PRED_A, TARGET_A, num_classes=3)["miou"] == pytest.approx(1.5 / 3)


@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_ignored_pixels_are_left_out(ignore_index):
    target = TARGET_A.copy()
    target[1, 2] = ignore_index  # the pixel predicted 0 where the target was 2
    pred = PRED_A.copy()
    pred[1, 2] = 99 if ignore_index == 255 else 0  # anything may be predicted on an ignored pixel
    r = segmentation_metrics(pred, target, num_classes=4, ignore_index=ignore_index)
    # class 0: inter 1, pred 1, target 2 -> 1/2; class 1: 2/3 as before; class 2: inter 1, pred 1, target 1 -> 1
    assert r["iou"] == pytest.approx([1 / 2, 2 / 3, 1.0, 0.0])
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 0) / 4)  # 13/24
    assert r["pixel_accuracy"] == pytest.approx(4 / 5)


# A second 2x3 image: all class 3, one pixel predicted 0.
TARGET_B = np.full((2, 3), 3)
PRED_B = np.array([[3, 3, 3], [3, 3, 0]])
# alone: class 3 inter 5, union 6 -> 5/6; class 0 inter 0, union 1 -> 0; miou (5/6) / 4 = 5/24
# A and B summed: class 0 inter 1, pred 3, target 2 -> union 4 -> 1/4; class 1 2/3; class 2 1/2; class 3 5/6
WHOLE_MIOU = (1 / 4 + 2 / 3 + 1 / 2 + 5 / 6) / 4  # 9/16, while the mean of per-image mIoUs is (3/8 + 5/24) / 2


def test_a_batch_is_scored_as_one_dataset_whatever_its_shape():
    batch_pred, batch_target = np.stack([PRED_A, PRED_B]), np.stack([TARGET_A, TARGET_B])  # [2, 2, 3]
    r = segmentation_metrics(batch_pred, batch_target, num_classes=4)
    assert r["miou"] == pytest.approx(WHOLE_MIOU)
    assert r["miou"] != pytest.approx((3 / 8 + 5 / 24) / 2)
    assert r["pixel_accuracy"] == pytest.approx(9 / 12)
    flat = segmentation_metrics(batch_pred.reshape(-1), batch_target.reshape(-1), num_classes=4)
    assert flat == r


def test_meter_over_batches_equals_the_function_on_the_concatenation():
    meter = SegmentationMeter(4)
    meter.update(PRED_A, TARGET_A)
    meter.update(torch.from_numpy(PRED_B), torch.from_numpy(TARGET_B))
    assert meter.compute()["miou"] == pytest.approx(WHOLE_MIOU)

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 5, (7, 4, 6), generator=g), torch.randint(-1, 5, (7, 4, 6), generator=g)
    meter = SegmentationMeter(5)
    for i in range(0, 7, 3):  # uneven batches: 3, 3, 1
        meter.update(pred[i : i + 3], target[i : i + 3])
    assert meter.compute() == segmentation_metrics(pred, target, 5)


def test_numpy_and_torch_inputs_give_the_same_scores():
    ref = segmentation_metrics(PRED_A, TARGET_A, 4)
    assert segmentation_metrics(torch.from_numpy(PRED_A), torch.from_numpy(TARGET_A), 4) == ref
    assert segmentation_metrics(PRED_A.astype(np.uint8), torch.from_numpy(TARGET_A).int(), 4) == ref
    assert segmentation_metrics(PRED_A.tolist(), TARGET_A.tolist(), 4) == ref


# Binary episodes: 0 'others', 1 the class.
EP1_TARGET = np.array([[0, 0, 1], [0, 1, 1]])
EP1_PRED = np.array([[0, 0, 1], [1, 1, 1]])
# background: target {00, 01, 10}, pred {00, 01}: inter 2, union 3 -> 2/3
# foreground: target {02, 11, 12}, pred {02, 10, 11, 12}: inter 3, union 4 -> 3/4
EP2_TARGET = np.array([[1, 1, 1], [0, 0, 0]])
EP2_PRED = np.ones((2, 3), dtype=np.int64)
# background: inter 0, union 3 -> 0; foreground: inter 3, union 6 -> 1/2


def test_fb_iou_hand_made():
    assert fb_iou(EP1_PRED, EP1_TARGET) == pytest.approx((2 / 3 + 3 / 4) / 2)  # 17/24
    # two episodes pooled: background inter 2, union 6 -> 1/3; foreground inter 6, union 10 -> 3/5
    pooled = (1 / 3 + 3 / 5) / 2  # 7/15, not the mean of the per-episode FB-IoUs
    assert fb_iou(np.stack([EP1_PRED, EP2_PRED]), np.stack([EP1_TARGET, EP2_TARGET])) == pytest.approx(pooled)


def test_fold_miou_averages_each_class_foreground_iou():
    pred, target = np.stack([EP1_PRED, EP2_PRED, EP1_PRED]), np.stack([EP1_TARGET, EP2_TARGET, EP1_TARGET])
    r = fold_metrics(pred, target, class_ids=[7, 9, 7])
    # class 7 (episodes 1 and 3): foreground inter 6, union 8 -> 3/4; class 9: 1/2
    assert r["iou"] == pytest.approx({7: 3 / 4, 9: 1 / 2})
    assert r["miou"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # pooled: background inter 4, union 9 -> 4/9; foreground inter 9, union 14 -> 9/14
    assert r["fb_iou"] == pytest.approx((4 / 9 + 9 / 14) / 2)
    assert r["fb_iou"] == pytest.approx(fb_iou(pred, target))

    meter = FoldMeter(ignore_index=255)  # episode by episode, as an evaluation loop feeds it
    for i, c in enumerate([7, 9, 7]):
        meter.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(target[i : i + 1]), torch.tensor([c]))
    assert meter.compute() == r  # integer counts summed in another order: the same floats


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: segmentation_metrics(np.zeros((2, 3), int), np.zeros((3, 2), int), 4), "of one shape"),
        (lambda: segmentation_metrics(np.zeros((2, 4, 3)), np.zeros((2, 3), int), 4), "integer class indices"),
        (lambda: segmentation_metrics(np.array([0, 4]), np.array([0, 1]), 4), "pred holds label 4 outside 0..3"),
        (lambda: segmentation_metrics(np.array([0, 1]), np.array([0, -2]), 4), "target holds label -2"),
        (lambda: segmentation_metrics(np.array([0]), np.array([0]), 0), "num_classes must be a positive integer"),
        (lambda: segmentation_metrics(np.array([0]), np.array([0]), 4, ignore_index=0), "ignore_index 0 is one of"),
        (lambda: fb_iou(np.array([0, 2]), np.array([0, 1])), "outside 0..1"),
        (lambda: fold_metrics(np.zeros((2, 3), int), np.zeros((2, 3), int), [1, 2, 3]), "one class id per episode"),
        (lambda: FoldMeter().compute(), "before any update"),
    ],
)
def test_bad_segmentation_input_is_a_one_line_error(call, message):
    with pytest.raises(VitlabError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_hand_made_with_a_tie():
    sims = np.array(
        [
            [0.9, 0.1, 0.2],  # query of item 0: first                                -> rank 0
            [0.5, 0.5, 0.1],  # query of item 1: tied with item 0 for first place     -> rank (0 + 1) / 2 = 0.5
            [0.8, 0.7, 0.3],  # query of item 2: two higher                           -> rank 2
        ]
    )
    r = retrieval_metrics(sims)
    # t2v 0-based ranks [0, 0.5, 2]: a tie for first place is not R@1 (MMT counts rank == 0)
    assert r["t2v_r1"] == pytest.approx(100 / 3)
    assert r["t2v_r5"] == r["t2v_r10"] == 100
    assert r["t2v_medr"] == pytest.approx(1.5)  # median 0.5, 1-based
    assert r["t2v_meanr"] == pytest.approx(2.5 / 3 + 1)
    # v2t, down each column: item 0 [0.9, 0.5, 0.8] own 0.9 -> 0; item 1 [0.1, 0.5, 0.7] own 0.5 -> 1;
    # item 2 [0.2, 0.1, 0.3] own 0.3 -> 0
    assert r["v2t_r1"] == pytest.approx(200 / 3)
    assert r["v2t_medr"] == 1
    assert r["v2t_meanr"] == pytest.approx(1 / 3 + 1)


def test_constant_similarities_rank_everything_in_the_middle():
    # 10 items all tied: every rank is the average of places 1..10 = 5.5 (0-based 4.5), not a perfect 1
    r = retrieval_metrics(np.zeros((10, 10)))
    for d in ("t2v", "v2t"):
        assert r[f"{d}_r1"] == 0
        assert r[f"{d}_r5"] == 100  # MMT counts 0-based rank < 5, and 4.5 is
        assert r[f"{d}_medr"] == r[f"{d}_meanr"] == 5.5


def test_two_queries_per_item():
    sims = np.array(
        [
            [0.2, 0.9],  # item 0, caption a: item 1 higher   -> t2v rank 1
            [0.6, 0.1],  # item 0, caption b                  -> 0
            [0.3, 0.4],  # item 1, caption a                  -> 0
            [0.8, 0.8],  # item 1, caption b: tie for first   -> 0.5
        ]
    )
    r = retrieval_metrics(sims, queries_per_item=2)
    assert r["t2v_r1"] == 50
    assert r["t2v_medr"] == pytest.approx(0.25 + 1)  # median of [0, 0, 0.5, 1]
    assert r["t2v_meanr"] == pytest.approx(1.5 / 4 + 1)
    # v2t over all 4 captions: item 0's column [0.2, 0.6, 0.3, 0.8]: caption a 3, caption b 1 -> closest 1;
    # item 1's column [0.9, 0.1, 0.4, 0.8]: caption a 2, caption b 1 -> closest 1
    assert r["v2t_r1"] == 0 and r["v2t_r5"] == 100
    assert r["v2t_medr"] == r["v2t_meanr"] == 2


def test_own_captions_tied_at_the_top_share_the_first_places():
    sims = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    # item 0's column [1, 1, 0, 0]: its two captions tie for first -> both rank 0.5, closest 0.5 (MMT's averaging)
    # item 1's column [0, 0, 1, 0.5]: caption a first -> 0
    r = retrieval_metrics(sims, queries_per_item=2)
    assert r["v2t_r1"] == 50
    assert r["v2t_medr"] == pytest.approx(0.25 + 1)
    assert r["t2v_r1"] == 100


def test_retrieval_numpy_and_torch_agree():
    g = torch.Generator().manual_seed(0)
    sims = torch.randint(0, 4, (12, 6), generator=g).float() / 4  # coarse values: many ties
    ref = retrieval_metrics(sims.numpy(), queries_per_item=2)
    assert retrieval_metrics(sims, queries_per_item=2) == ref
    assert retrieval_metrics(sims.to(torch.bfloat16), queries_per_item=2) == ref  # quarters are exact in bf16
    assert retrieval_metrics(sims.double().numpy(), queries_per_item=2) == ref


@pytest.mark.parametrize(
    "sims, queries_per_item, message",
    [
        (np.zeros(5), 1, "must be a matrix"),
        (np.zeros((4, 0)), 1, "at least one item"),
        (np.zeros((5, 2)), 2, "5 rows but 2 items x queries_per_item 2 = 4"),
        (np.zeros((3, 3)), 0, "queries_per_item must be a positive integer"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), 1, "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), 1, "real numbers"),
    ],
)
def test_bad_retrieval_input_is_a_one_line_error(sims, queries_per_item, message):
    with pytest.raises(VitlabError, match=message) as e:
        retrieval_metrics(sims, queries_per_item)
    assert "\n" not in str(e.value)
