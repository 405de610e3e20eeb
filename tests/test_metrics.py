import math

import numpy as np
import pytest
import torch

from gkd.evaluate.metrics import ConfusionMatrix, metrics_from_confusion


def test_miou_of_a_hand_made_confusion():
    # rows = ground truth, cols = prediction
    matrix = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    result = metrics_from_confusion(matrix)
    iou0 = 3 / (3 + 2 + 1)  # TP / (TP + FP + FN)
    iou1 = 4 / (4 + 1 + 2)
    assert result["iou"][0] == pytest.approx(100 * iou0)
    assert result["iou"][1] == pytest.approx(100 * iou1)
    assert result["iou"][2] is None  # absent from ground truth and prediction: left out of the mean
    assert result["miou"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert result["pixel_accuracy"] == pytest.approx(100 * 7 / 10)


def test_confusion_accumulates_over_batches_and_ignores_255():
    confusion = ConfusionMatrix(num_classes=3)
    confusion.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [255, 1]]))
    confusion.update(torch.tensor([2, 0]), torch.tensor([2, 255]))
    expected = np.zeros((3, 3), int)
    expected[0, 0] = expected[1, 1] = expected[1, 2] = expected[2, 2] = 1
    np.testing.assert_array_equal(confusion.matrix.numpy(), expected)
    result = confusion.compute()
    assert result["pixels"] == 4
    assert result["miou"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)


def test_split_level_miou_is_not_a_mean_of_image_ious():
    confusion = ConfusionMatrix(num_classes=2)
    confusion.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1
    confusion.update(torch.tensor([1]), torch.tensor([1]))  # image 2
    # pooled: class 0 IoU 3/4, class 1 IoU 1/2
    assert confusion.compute()["miou"] == pytest.approx(100 * (0.75 + 0.5) / 2)


def test_target_out_of_range_is_an_error():
    confusion = ConfusionMatrix(num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        confusion.update(torch.tensor([0]), torch.tensor([5]))
    assert math.isnan(ConfusionMatrix(2).compute()["miou"])


@pytest.mark.parametrize("bad", [2, -1, 255])
def test_prediction_out_of_range_is_an_error(bad):
    """Before: 2 was counted as (next ground-truth class, class 0), -1 as the previous class's last column,
    and 255 failed in a reshape with no word about the prediction."""
    confusion = ConfusionMatrix(num_classes=2)
    with pytest.raises(ValueError, match=rf"predicted ids \[{bad}\] outside \[0, 2\)"):
        confusion.update(torch.tensor([0, bad]), torch.tensor([0, 0]))
    assert confusion.matrix.sum() == 0
