"""transformers' own common tests (`ModelTesterMixin`, `BackboneTesterMixin`, `ConfigTester`) on the Focal models,
with a model tester written like transformers' Swin tester (tests/models/swin/test_modeling_swin.py), for both
attention types with shifted windows. The common test modules come from the sdist of the installed transformers
(see transformers_sdist.py); the tests skipped here are the ones Swin's tester skips, for its reasons."""

import contextlib
import tempfile
import unittest
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device
from transformers_sdist import common_tests

from focal_hf import FocalBackbone, FocalConfig, FocalForImageClassification, FocalModel
from focal_hf.modeling_focal import FocalAttentionBase

common = common_tests()
floats_tensor, ids_tensor = common.modeling.floats_tensor, common.modeling.ids_tensor


@pytest.fixture(autouse=True, scope="module")
def _focal_in_auto_mapping_names():
    """The common tests tell base models, backbones and classifiers (which get labels, which train) apart by the
    class names in transformers' Auto mappings of its own models; focal_hf registers Focal with the Auto classes at
    run time instead, so its names are added here as transformers' source lists Swin's."""
    names = {
        "MODEL_MAPPING_NAMES": FocalModel,
        "MODEL_FOR_BACKBONE_MAPPING_NAMES": FocalBackbone,
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": FocalForImageClassification,
    }
    with contextlib.ExitStack() as stack:
        for mapping, model_class in names.items():
            stack.enter_context(
                mock.patch.dict(getattr(modeling_auto, mapping), {FocalConfig.model_type: model_class.__name__})
            )
        yield


class FocalModelTester:
    """Swin's tester with Focal's settings: windows of 4 on a 16x16 first-stage grid (shifted in the second block of
    the second stage, which has an 8x8 grid), expanded surroundings of 2 tokens, one pooled level."""

    batch_size = 3
    image_size = 32
    patch_size = 2
    num_channels = 3
    embed_dim = 16
    depths = (1, 2, 1)
    num_heads = (2, 2, 4)
    window_size = 4
    is_training = True
    type_sequence_label_size = 10

    def __init__(self, parent, attention_type="focal"):
        self.parent = parent
        self.attention_type = attention_type

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
        return self.get_config(), pixel_values, labels

    def get_config(self):
        return FocalConfig(
            attention_type=self.attention_type,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            mlp_ratio=2.0,
            drop_path_rate=0.1,
            use_shift=True,
            focal_stages=[0, 1, 2],
            focal_levels=[2, 2, 2],
            focal_windows=[3, 3, 1],
            expand_sizes=[2, 2, 2],
            focal_topk=12,
            out_features=["stage1", "stage2"],
            out_indices=[1, 2],
        )

    def create_and_check_model(self, config, pixel_values, labels):
        model = FocalModel(config).to(torch_device).eval()
        result = model(pixel_values)
        expected_seq_len = ((config.image_size // config.patch_size) ** 2) // (4 ** (len(config.depths) - 1))
        expected_dim = int(config.embed_dim * 2 ** (len(config.depths) - 1))
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, expected_seq_len, expected_dim))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, expected_dim))

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = FocalBackbone(config).to(torch_device).eval()
        result = model(pixel_values)
        # feature maps and channels of out_features
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], 16, 16])
        self.parent.assertListEqual(list(result.feature_maps[1].shape), [self.batch_size, model.channels[1], 8, 8])
        self.parent.assertListEqual(model.channels, [16, 32])

        # the backbone works with out_features=None: the last stage
        config.out_features = None
        model = FocalBackbone(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, model.channels[-1], 4, 4])
        self.parent.assertListEqual(model.channels, [64])

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        config.num_labels = self.type_sequence_label_size
        model = FocalForImageClassification(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))
        self.parent.assertEqual(result.loss.shape, ())

        # greyscale images
        config.num_channels = 1
        model = FocalForImageClassification(config).to(torch_device).eval()
        pixel_values = floats_tensor([self.batch_size, 1, self.image_size, self.image_size])
        result = model(pixel_values)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class FocalModelTest(common.modeling.ModelTesterMixin, unittest.TestCase):
    attention_type = "focal"
    all_model_classes = (FocalModel, FocalBackbone, FocalForImageClassification)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = FocalModelTester(self, attention_type=self.attention_type)
        self.config_tester = common.configuration.ConfigTester(
            self,
            config_class=FocalConfig,
            attention_type=self.attention_type,
            embed_dim=48,
            has_text_modality=False,
            common_properties=["image_size", "patch_size", "num_channels"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    def test_sdpa_can_dispatch_non_composite_models(self):
        # Focal's version of the common test: the default is Focal's own named attention, "focal_sdpa" (the common
        # test expects transformers' "sdpa" there); "sdpa" and "eager" load as requested, in every attention layer
        for model_class in self.all_model_classes:
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            with tempfile.TemporaryDirectory() as folder:
                model_class(config).save_pretrained(folder)
                for requested, expected in ((None, "focal_sdpa"), ("sdpa", "sdpa"), ("eager", "eager")):
                    kwargs = {"attn_implementation": requested} if requested else {}
                    model = model_class.from_pretrained(folder, **kwargs)
                    self.assertEqual(model.config._attn_implementation, expected)
                    layers = [module for module in model.modules() if isinstance(module, FocalAttentionBase)]
                    self.assertTrue(layers)
                    self.assertTrue(all(layer.config._attn_implementation == expected for layer in layers))

    @unittest.skip(reason="Focal does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Focal Transformer does not use feedforward chunking")
    def test_feed_forward_chunking(self):
        pass

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, torch.nn.Linear))

    def check_attentions(self, attentions):
        """One attention map per stage, `(batch * windows, heads, window tokens, keys)`, rows summing to one. A
        window attends its own tokens, its surroundings and pooled windows: more keys than Swin's window tokens."""
        tester = self.model_tester
        self.assertEqual(len(attentions), len(tester.depths))
        grid = tester.image_size // tester.patch_size
        windows = (grid // tester.window_size) ** 2
        batch_windows, heads, queries, keys = attentions[0].shape
        self.assertEqual((batch_windows, heads, queries), (tester.batch_size * windows, tester.num_heads[0], 16))
        self.assertGreater(keys, queries)
        torch.testing.assert_close(attentions[0].sum(-1), torch.ones(batch_windows, heads, queries))

    def test_attention_outputs(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.return_dict = True

        for model_class in self.all_model_classes:
            inputs_dict["output_attentions"] = True
            inputs_dict["output_hidden_states"] = False
            config.return_dict = True
            model = model_class._from_config(config, attn_implementation="eager")
            config = model.config
            model.to(torch_device).eval()
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs_dict, model_class))
            self.check_attentions(outputs.attentions)

            # output_attentions also works from the config
            del inputs_dict["output_attentions"]
            config.output_attentions = True
            model = model_class(config).to(torch_device).eval()
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs_dict, model_class))
            self.check_attentions(outputs.attentions)
            out_len = len(outputs)

            # attentions come last, after the hidden states (and the reshaped ones of the non-backbone models)
            inputs_dict["output_attentions"] = True
            inputs_dict["output_hidden_states"] = True
            model = model_class(config).to(torch_device).eval()
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs_dict, model_class))
            added_hidden_states = 1 if model_class is FocalBackbone else 2
            self.assertEqual(out_len + added_hidden_states, len(outputs))
            self.check_attentions(outputs.attentions)

    def check_hidden_states_output(self, inputs_dict, config, model_class, image_size):
        model = model_class(config).to(torch_device).eval()
        with torch.no_grad():
            outputs = model(**self._prepare_for_class(inputs_dict, model_class))
        hidden_states = outputs.hidden_states
        expected_num_layers = len(self.model_tester.depths) + 1
        self.assertEqual(len(hidden_states), expected_num_layers)

        # the stem floors a side that is not a multiple of the patch size, as the official convolution does
        height, width = image_size[0] // config.patch_size, image_size[1] // config.patch_size
        num_patches = height * width
        if model_class is FocalBackbone:  # the reshaped hidden states, (batch_size, channels, height, width)
            self.assertListEqual(list(hidden_states[0].shape[1:]), [self.model_tester.embed_dim, height, width])
            return
        self.assertListEqual(list(hidden_states[0].shape[-2:]), [num_patches, self.model_tester.embed_dim])
        reshaped_hidden_states = outputs.reshaped_hidden_states
        self.assertEqual(len(reshaped_hidden_states), expected_num_layers)
        batch_size, num_channels, height, width = reshaped_hidden_states[0].shape
        reshaped = reshaped_hidden_states[0].view(batch_size, num_channels, height * width).permute(0, 2, 1)
        self.assertListEqual(list(reshaped.shape[-2:]), [num_patches, self.model_tester.embed_dim])

    def _check_hidden_states_both_ways(self, config, inputs_dict):
        """Hidden states asked for by argument, then by the config."""
        image_size = (self.model_tester.image_size, self.model_tester.image_size)
        for model_class in self.all_model_classes:
            inputs_dict["output_hidden_states"] = True
            self.check_hidden_states_output(inputs_dict, config, model_class, image_size)
            del inputs_dict["output_hidden_states"]
            config.output_hidden_states = True
            self.check_hidden_states_output(inputs_dict, config, model_class, image_size)

    def test_hidden_states_output(self):
        self._check_hidden_states_both_ways(*self.model_tester.prepare_config_and_inputs_for_common())

    def test_hidden_states_output_with_padding(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.patch_size = 3  # 32 px: 10 patches per side, windows of 4 padded in the first two stages (10, 5 tokens)
        self._check_hidden_states_both_ways(config, inputs_dict)


class FocalFastModelTest(FocalModelTest):
    attention_type = "focal_fast"


class FocalBackboneTest(common.backbone.BackboneTesterMixin, unittest.TestCase):
    attention_type = "focal"
    all_model_classes = (FocalBackbone,)
    config_class = FocalConfig

    def setUp(self):
        self.model_tester = FocalModelTester(self, attention_type=self.attention_type)


class FocalFastBackboneTest(FocalBackboneTest):
    attention_type = "focal_fast"
