"""The Focal backbone in transformers' dense-prediction heads (UperNet, DETR, Mask2Former): training at two input
sizes with and without gradient checkpointing, converted classification weights loaded into the backbone, and the
semantic-segmentation example (training on a generated data set, mean IoU, a folder the pipeline loads)."""

import importlib.util
import json
import os
import random
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import (
    AutoModelForSemanticSegmentation,
    DetrConfig,
    DetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)

from focal_hf import FocalBackbone, FocalForImageClassification
from focal_hf.dense import (
    ALL_STAGES,
    enable_gradient_checkpointing,
    find_focal_backbone,
    focal_backbone_config,
    load_backbone_weights,
)

HEADS = ["upernet", "detr", "mask2former"]
SIZES = [(64, 64), (96, 80)]  # square, and non-square with sides that are not multiples of 32
NUM_LABELS = 3
NUM_QUERIES = 5
# the final LayerNorm of the wrapped FocalModel normalises the last tokens for classification; backbones output
# their own per-stage norms, so it gets no gradient in any head
CLASSIFICATION_ONLY = {"focal.layernorm.weight", "focal.layernorm.bias"}  # not part of a backbone
# `--gradient_checkpointing` is the deprecated alias of `--activation_checkpointing` in recent transformers releases
CHECKPOINTING_FLAG = (
    "--activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "--gradient_checkpointing"
)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "run_semantic_segmentation.py"


def backbone_config(head):
    """Tiny Focal backbone: DETR reads only the last stage, UperNet and Mask2Former all four."""
    return tiny_config(out_features=["stage4"] if head == "detr" else list(ALL_STAGES))


def build(head, config):
    """A tiny dense model of kind `head` around the Focal backbone `config`."""
    if head == "upernet":
        return UperNetForSemanticSegmentation(
            UperNetConfig(
                backbone_config=config, hidden_size=32, auxiliary_channels=16, use_auxiliary_head=True, num_labels=3
            )
        )
    if head == "detr":
        return DetrForObjectDetection(
            DetrConfig(
                backbone_config=config,
                use_timm_backbone=False,
                use_pretrained_backbone=False,
                num_queries=NUM_QUERIES,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                dropout=0.0,
                num_labels=NUM_LABELS,
            )
        )
    return Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(
            backbone_config=config,
            feature_size=32,
            mask_feature_size=32,
            hidden_dim=32,
            encoder_feedforward_dim=32,
            encoder_layers=1,
            decoder_layers=2,
            num_attention_heads=2,
            dim_feedforward=32,
            num_queries=NUM_QUERIES,
            train_num_points=256,
            num_labels=NUM_LABELS,
        )
    )


def training_step(model, head, size):
    """Forward with generated targets and backward at `size`; checks the outputs; returns the loss."""
    height, width = size
    generator = torch.Generator().manual_seed(height * 1000 + width)
    pixel_values = torch.randn(2, 3, height, width, generator=generator)
    if head == "upernet":
        outputs = model(pixel_values, labels=torch.randint(0, NUM_LABELS, (2, height, width), generator=generator))
        assert outputs.logits.shape == (2, NUM_LABELS, height, width)
    elif head == "detr":
        labels = [
            {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])}
            for _ in range(2)
        ]
        outputs = model(pixel_values, labels=labels)
        assert outputs.logits.shape == (2, NUM_QUERIES, NUM_LABELS + 1)
        assert outputs.pred_boxes.shape == (2, NUM_QUERIES, 4)
    else:
        masks = [(torch.rand(2, height, width, generator=generator) > 0.5).float() for _ in range(2)]
        outputs = model(pixel_values, mask_labels=masks, class_labels=[torch.tensor([0, 2])] * 2)
        assert outputs.masks_queries_logits.shape == (2, NUM_QUERIES, height // 4, width // 4)
        assert outputs.class_queries_logits.shape == (2, NUM_QUERIES, NUM_LABELS + 1)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    return outputs.loss.detach()


def gradients(model, head, size):
    model.zero_grad()
    torch.manual_seed(0)  # Mask2Former samples its loss points at random
    loss = training_step(model, head, size)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", HEADS)
def test_head_trains_at_two_sizes_with_gradient_checkpointing(head):
    model = build(head, backbone_config(head)).train()
    backbone = find_focal_backbone(model)
    assert isinstance(backbone, FocalBackbone)
    prefix = next(name for name, module in model.named_modules() if module is backbone) + "."
    reference = {size: gradients(model, head, size) for size in SIZES}
    for _, grads in reference.values():  # every backbone weight the features depend on learns
        backbone_grads = {name[len(prefix) :]: grad for name, grad in grads.items() if name.startswith(prefix)}
        expected = {name for name, _ in backbone.named_parameters()}
        assert set(backbone_grads) == expected
        assert all(torch.isfinite(grad).all() for grad in backbone_grads.values())
        assert backbone_grads["focal.embeddings.patch_embeddings.projection.weight"].abs().sum() > 0

    target = enable_gradient_checkpointing(model)
    assert target is (model if head == "detr" else backbone)  # UperNet and Mask2Former refuse it themselves
    assert backbone.is_activation_checkpointing
    block = backbone.focal.encoder.layers[1].blocks[0]
    calls = []
    block.attention.register_forward_hook(lambda *args: calls.append(1))
    for size in SIZES:
        loss, checkpointed = gradients(model, head, size)
        torch.testing.assert_close(loss, reference[size][0])
        assert checkpointed.keys() == reference[size][1].keys()
        for name, grad in checkpointed.items():
            torch.testing.assert_close(grad, reference[size][1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert len(calls) == 2 * len(SIZES)  # each block ran once more in backward


def classification_folder(path, randomize=True, **overrides):
    """A converted classification folder; with `randomize`, every weight random (none equals an initialisation)."""
    model = FocalForImageClassification(tiny_config(**overrides))
    if randomize:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("head", HEADS)
def test_converted_classification_folder_loads_into_each_head(tmp_path, head):
    classifier = classification_folder(tmp_path / "converted")
    out_features = ["stage4"] if head == "detr" else list(ALL_STAGES)
    config = focal_backbone_config(tmp_path / "converted", out_features=out_features, drop_path_rate=0.05)
    assert config.out_features == out_features and config.drop_path_rate == 0.05
    assert config.num_labels == 2 and config.architectures is None  # the classifier's labels are not carried over
    model = build(head, config)
    backbone = load_backbone_weights(model, tmp_path / "converted")
    assert backbone is find_focal_backbone(model)

    loaded = backbone.focal.state_dict()
    source = classifier.focal.state_dict()
    # every weight the backbone uses comes from the folder (the final LayerNorm is for classification only)
    assert {f"focal.{name}" for name in source} - {f"focal.{name}" for name in loaded} <= CLASSIFICATION_ONLY
    assert loaded.keys() <= source.keys()
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, source[name], rtol=0, atol=0, msg=name)
    for stage in out_features:  # new per-stage norms: LayerNorm's initialisation
        norm = backbone.hidden_states_norms[stage]
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    for name, parameter in model.named_parameters():  # the head is initialised, not left empty
        assert torch.isfinite(parameter).all(), name

    if head == "upernet":  # the saved segmentation model reloads with the same weights and outputs
        model.eval().save_pretrained(tmp_path / "segmentation")
        reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segmentation").eval()
        saved = model.state_dict()
        for name, tensor in reloaded.state_dict().items():
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
        pixel_values = torch.randn(1, 3, 70, 50)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)
        with pytest.raises(ValueError, match="not a Focal Transformer checkpoint"):
            focal_backbone_config(tmp_path / "segmentation")


def test_bad_arguments_raise_clear_errors(tmp_path):
    classification_folder(tmp_path / "converted")
    wider = build("upernet", tiny_config(embed_dim=32, out_features=list(ALL_STAGES)))
    with pytest.raises(ValueError, match="does not fit the model's Focal backbone"):
        load_backbone_weights(wider, tmp_path / "converted")
    with pytest.raises(ValueError, match="exactly one FocalBackbone"):
        find_focal_backbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="list of stage names"):
        focal_backbone_config(tmp_path / "converted", out_features="stage4")


# ---------------------------------------------------------------------------------------------- the example
def load_example():
    """The example script as a module (registered, as its dataclasses need)."""
    if "run_semantic_segmentation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("run_semantic_segmentation", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["run_semantic_segmentation"]


def scene(rng, height, width):
    """An image with a red and a blue rectangle on grey, and its map in ADE20K's convention: 0 "other" (a thin
    border, ignored after label reduction), 1 background, 2 red, 3 blue."""
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    annotation = np.ones((height, width), dtype=np.uint8)
    for value, colour in ((2, (220, 30, 30)), (3, (30, 30, 220))):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        bottom, right = top + rng.integers(height // 4, height // 2), left + rng.integers(width // 4, width // 2)
        image[top:bottom, left:right] = colour
        annotation[top:bottom, left:right] = value
    annotation[:2], annotation[:, :2] = 0, 0
    noise = rng.integers(-20, 20, image.shape)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)), Image.fromarray(annotation)


def test_mean_iou_matches_the_evaluate_definition():
    example = load_example()
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 4, (3, 20, 30))
    references = rng.integers(0, 4, (3, 20, 30))
    references[references == 3] = 255  # class 3 only predicted: IoU 0; class 4 nowhere: nan
    references[0, 0, :5] = 7  # out of range, as np.histogram drops it
    metric = example.MeanIoU(num_labels=5)
    metric.update(torch.from_numpy(predictions[:1]), torch.from_numpy(references[:1]))
    metric.update(predictions[1:], references[1:])
    result = metric.compute()
    # evaluate's mean_iou: histograms of the non-ignored pixels summed over the images, then the ratios
    totals = np.zeros((3, 5))
    for prediction, reference in zip(predictions, references):
        keep = reference != 255
        prediction, reference = prediction[keep], reference[keep]
        intersect = prediction[prediction == reference]
        for row, values in enumerate((intersect, prediction, reference)):
            totals[row] += np.histogram(values, bins=5, range=(0, 4))[0]
    area_intersect, area_pred, area_label = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = area_intersect / (area_pred + area_label - area_intersect)
        accuracy = area_intersect / area_label
    np.testing.assert_allclose(result["per_category_iou"], iou)
    np.testing.assert_allclose(result["per_category_accuracy"], accuracy)
    assert result["mean_iou"] == pytest.approx(np.nanmean(iou))
    assert result["mean_accuracy"] == pytest.approx(np.nanmean(accuracy))
    assert result["overall_accuracy"] == pytest.approx(area_intersect.sum() / area_label.sum())
    assert result["per_category_iou"][3] == 0 and np.isnan(result["per_category_iou"][4])


def test_folder_layout_is_read_and_checked(tmp_path):
    example = load_example()
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    for index in range(3):
        image, annotation = scene(rng, 40, 48)
        image.save(tmp_path / "train" / "images" / f"scene{index}.jpg")
        annotation.save(tmp_path / "train" / "masks" / f"scene{index}.png")
    dataset = example.folder_dataset(tmp_path / "train")
    assert dataset.column_names == ["image", "annotation"] and len(dataset) == 3
    assert np.asarray(dataset[1]["annotation"]).max() == 3 and dataset[1]["image"].size == (48, 40)
    (tmp_path / "train" / "masks" / "scene2.png").rename(tmp_path / "train" / "masks" / "other.png")
    with pytest.raises(ValueError, match="no image or no mask"):
        example.folder_dataset(tmp_path / "train")
    with pytest.raises(ValueError, match="either --dataset_name or --train_dir"):
        example.DataTrainingArguments(dataset_name="x", train_dir=str(tmp_path / "train"), num_labels=3)
    with pytest.raises(ValueError, match="Give the classes"):
        example.DataTrainingArguments(train_dir=str(tmp_path / "train"))


def test_training_augmentation_is_seeded_and_keeps_maps_aligned():
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    example = load_example()
    data_args = example.DataTrainingArguments(
        dataset_name="unused", num_labels=3, reduce_labels=True, crop_size=64, base_size=40, max_scale=1.0
    )
    processor = SegformerImageProcessorPil(size={"height": 64, "width": 64}, do_reduce_labels=True)
    seed = example.AugmentationSeed(0)
    train_transforms, eval_transforms = example.make_transforms(processor, data_args, "annotation", seed, 3)
    rng = np.random.default_rng(0)
    scenes = [scene(rng, 60, 90) for _ in range(3)]
    batch = {
        "image": [image for image, _ in scenes],
        "annotation": [mask for _, mask in scenes],
        "example_index": [0, 1, 2],
    }
    first = train_transforms(batch)
    assert [tuple(x.shape) for x in first["pixel_values"]] == [(3, 64, 64)] * 3
    for labels in first["labels"]:
        assert labels.shape == (64, 64) and set(labels.unique().tolist()) <= {0, 1, 2, 255}
        assert (labels == 255).any()  # scaled to a shorter side of at most 40 px: padded with ignored pixels
    again = train_transforms(batch)
    for a, b in zip(first["pixel_values"] + first["labels"], again["pixel_values"] + again["labels"]):
        assert torch.equal(a, b)  # the same example in the same epoch: the same augmentation
    seed.epoch = 1
    assert not torch.equal(train_transforms(batch)["labels"][0], first["labels"][0])
    evaluated = eval_transforms(batch)
    assert evaluated["labels"][0].shape == (64, 64) and evaluated["pixel_values"][0].shape == (3, 64, 64)
    too_few = example.make_transforms(processor, data_args, "annotation", seed, 2)[1]
    with pytest.raises(ValueError, match="holds class 2 \\(after --reduce_labels\\), but the model has 2 classes"):
        too_few(batch)

    # a crop is redrawn (up to 10 times) while one class covers `cat_max_ratio` or more of its labelled pixels
    mask = np.zeros((40, 200), dtype=np.uint8)
    mask[:, 150:] = 1  # only crops starting in (120, 140) hold both classes in a 1:3 to 3:1 ratio

    def balanced_crops(cat_max_ratio):
        crops = [
            np.asarray(example.random_crop(image, Image.fromarray(mask), 40, random.Random(i), cat_max_ratio)[1])
            for i in range(50)
        ]
        return sum(0.25 < (crop == 1).mean() < 0.75 for crop in crops)

    image = Image.new("RGB", (200, 40))
    assert balanced_crops(1.0) < 15 and balanced_crops(0.75) > 25


def test_segmentation_example_trains_and_saves_a_pipeline_folder(tmp_path):
    """UperNet + Focal from a converted folder on a generated data set in the `scene_parse_150` layout: the loss
    falls, mean IoU is reported, and the output folder serves `pipeline("image-segmentation")`."""
    import datasets

    example = load_example()
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, count in (("train", 16), ("validation", 4)):
        scenes = [scene(rng, 72, 88) for _ in range(count)]
        split_data = datasets.Dataset.from_dict(
            {"image": [image for image, _ in scenes], "annotation": [annotation for _, annotation in scenes]},
            features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}),
        )
        split_data.to_parquet(str(data / f"{split}.parquet"))
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "background", "1": "red", "2": "blue"}))
    classification_folder(tmp_path / "converted", randomize=False, num_labels=7)
    output = tmp_path / "out"
    metrics = example.main(
        [
            "--model_name_or_path", str(tmp_path / "converted"),
            "--dataset_name", str(data),
            "--reduce_labels",
            "--id2label_file", str(tmp_path / "id2label.json"),
            "--upernet_hidden_size", "32",
            "--auxiliary_channels", "16",
            "--crop_size", "64",
            "--base_size", "72",
            "--output_dir", str(output),
            "--do_train", "--do_eval",
            "--max_steps", "16",
            "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "2",
            "--learning_rate", "2e-3",
            "--warmup_steps", "0",
            "--lr_scheduler_type", "constant",
            "--logging_steps", "1",
            "--save_strategy", "no",
            "--report_to", "none",
            CHECKPOINTING_FLAG,
            "--seed", "0",
            "--dataloader_num_workers", "0",
            "--dataloader_pin_memory", "false",
        ]
    )  # fmt: skip
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    assert 0 <= metrics["eval_mean_iou"] <= 1 and 0 <= metrics["eval_overall_accuracy"] <= 1
    assert {"eval_iou_background", "eval_iou_red", "eval_iou_blue"} <= metrics.keys()

    model = AutoModelForSemanticSegmentation.from_pretrained(output)
    assert isinstance(model, UperNetForSemanticSegmentation) and isinstance(model.backbone, FocalBackbone)
    assert model.config.id2label == {0: "background", 1: "red", 2: "blue"}
    segmenter = pipeline("image-segmentation", model=str(output))
    image, _ = scene(rng, 50, 70)
    segments = segmenter(image)
    assert segments and {segment["label"] for segment in segments} <= {"background", "red", "blue"}
    assert all(segment["mask"].size == image.size for segment in segments)
    trained = json.loads((output / "config.json").read_text())
    assert trained["backbone_config"]["model_type"] == "focal"
    assert len(trained["backbone_config"].get("id2label", {})) <= 2  # not the classifier's 7 labels


def test_segmentation_example_refuses_a_used_output_dir_unless_resuming_or_overwriting(tmp_path):
    """As the classification Trainer example: a non-empty --output_dir is refused (nothing touched) unless the run
    resumes from it or --overwrite_output_dir is given, and the weights are written 0666 less the umask."""
    example = load_example()
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        for index in range(count):
            image, annotation = scene(rng, 40, 48)
            image.save(tmp_path / split / "images" / f"{index}.png")
            annotation.save(tmp_path / split / "masks" / f"{index}.png")
    classification_folder(tmp_path / "converted", randomize=False)
    output = tmp_path / "out"

    def train(*extra, output=output):
        return example.main(
            [
                "--model_name_or_path", str(tmp_path / "converted"),
                "--train_dir", str(tmp_path / "train"),
                "--validation_dir", str(tmp_path / "val"),
                "--reduce_labels", "--num_labels", "3",
                "--upernet_hidden_size", "16", "--auxiliary_channels", "8",
                "--crop_size", "32", "--base_size", "40",
                "--output_dir", str(output),
                "--do_train", "--per_device_train_batch_size", "2",
                "--save_strategy", "steps", "--save_steps", "1",
                "--report_to", "none", "--seed", "0",
                "--dataloader_num_workers", "0", "--dataloader_pin_memory", "false",
                *extra,
            ]
        )  # fmt: skip

    previous_umask = os.umask(0o027)  # neither the common 022 nor safetensors' private 0600
    try:
        train("--max_steps", "2")
    finally:
        os.umask(previous_umask)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for weights in (output / "model.safetensors", output / "checkpoint-2" / "model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == 0o640, weights
    before = (output / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is not empty .*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        train("--max_steps", "1")
    assert (output / "model.safetensors").read_bytes() == before  # nothing touched

    # resuming the newest checkpoint continues that run
    train("--max_steps", "3", "--resume_from_checkpoint", "latest")
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "train_loss" in e] == [3]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # --overwrite_output_dir trains anew: none of the earlier run's checkpoints is left mixed in
    train("--max_steps", "1", "--overwrite_output_dir")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 1

    with pytest.raises(ValueError, match="no checkpoint-\\* folder in"):
        train("--max_steps", "1", "--resume_from_checkpoint", "latest", output=tmp_path / "new")
