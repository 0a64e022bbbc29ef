"""--model-overrides at generation on transformer_rela checkpoints, as the stock transformer takes them (issue 23).

fairseq's build_model validates a checkpoint's model config against the dataclass a model is registered with only when
the config names the model itself: ``--arch transformer_rela`` (and ``fairseq-hydra-train`` with
``model._name=transformer_rela``), not the architectures registered beside it (``transformer_rela_tiny``, ...). The
checkpoints here are therefore trained with ``--arch transformer_rela`` and tiny dimensions given as options.
"""

import pytest
import torch
from conftest import TINY_SIZES
from fairseq import checkpoint_utils
from helpers import TINY_TRAIN_ARGS, USER_DIR, parse_generate_output, run_cli

# fairseq's examples/layerdrop: keep encoder layers 0 and 2 of 3 and decoder layer 1 of 2. fairseq's pruning drops
# every layer of a side that names no layers to keep, so both sides name theirs.
PRUNED = {"encoder_layers_to_keep": "0,2", "decoder_layers_to_keep": "1"}
TINY_DIMS = ["--encoder-layers", 3, "--decoder-layers", 2, "--encoder-embed-dim", 32, "--decoder-embed-dim", 32,
             "--encoder-ffn-embed-dim", 64, "--decoder-ffn-embed-dim", 64, "--encoder-attention-heads", 2,
             "--decoder-attention-heads", 2]
LAYERDROP = ["--encoder-layerdrop", 0.5, "--decoder-layerdrop", 0.5]


@pytest.fixture(scope="module")
def layerdrop_checkpoints(toy_bin, tmp_path_factory):
    """{arch: checkpoint}: transformer_rela through its dataclass and the stock transformer (a Namespace config), the
    same dimensions, each trained a few updates with LayerDrop."""
    checkpoints = {}
    for arch, stock_arch in (("transformer_rela", "transformer_rela"), ("transformer", "transformer_tiny")):
        save_dir = tmp_path_factory.mktemp(f"layerdrop_{arch}")
        args = [stock_arch if a == "transformer_rela_tiny" else a for a in TINY_TRAIN_ARGS]
        run_cli("fairseq-train", toy_bin, *args, *TINY_DIMS, *LAYERDROP, "--save-dir", save_dir, "--max-update", 6,
                "--no-epoch-checkpoints")
        checkpoints[arch] = save_dir / "checkpoint_last.pt"
    return checkpoints


def test_layerdrop_pruning_at_generation(layerdrop_checkpoints, toy_bin):
    checkpoint = layerdrop_checkpoints["transformer_rela"]
    gen = run_cli("fairseq-generate", toy_bin, "--user-dir", USER_DIR, "--path", checkpoint, "--beam", 2,
                  "--batch-size", 16, "--required-batch-size-multiple", 1, "--cpu", "--gen-subset", "test",
                  "--model-overrides", repr(PRUNED))
    assert "Pruning model to specified layer configuration" in gen.stdout + gen.stderr
    assert len(parse_generate_output(gen.stdout)) == TINY_SIZES["test"]

    # the model fairseq-generate decoded with: the kept layers' own weights, renumbered
    models, _ = checkpoint_utils.load_model_ensemble([str(checkpoint)], arg_overrides=PRUNED)
    pruned = models[0].state_dict()
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    assert (len(models[0].encoder.layers), len(models[0].decoder.layers)) == (2, 1)
    for kept, original in (("encoder.layers.0", "encoder.layers.0"), ("encoder.layers.1", "encoder.layers.2"),
                           ("decoder.layers.0", "decoder.layers.1")):
        for weight in ("fc1.weight", "self_attn.q_proj.weight"):
            torch.testing.assert_close(pruned[f"{kept}.{weight}"], trained[f"{original}.{weight}"], rtol=0, atol=0)


# override -> what it sets in the built model, read the same way from both
OVERRIDES = {
    "dropout": ({"dropout": 0.3}, lambda m: (m.encoder.dropout_module.p, m.decoder.dropout_module.p), (0.3, 0.3)),
    "attention_dropout": ({"attention_dropout": 0.2}, lambda m: m.encoder.layers[0].self_attn.dropout_module.p, 0.2),
    "activation_dropout": ({"activation_dropout": 0.2},
                           lambda m: m.decoder.layers[0].activation_dropout_module.p, 0.2),
    "layerdrop": ({"encoder_layerdrop": 0.0, "decoder_layerdrop": 0.25},
                  lambda m: (m.encoder.encoder_layerdrop, m.decoder.decoder_layerdrop), (0.0, 0.25)),
    "max_positions": ({"max_source_positions": 2048, "max_target_positions": 4096}, lambda m: m.max_positions(),
                      (2048, 4096)),
    "layers_to_keep": (PRUNED, lambda m: (len(m.encoder.layers), len(m.decoder.layers)), (2, 1)),
    "activation_fn": ({"activation_fn": "gelu"}, lambda m: m.encoder.layers[0].activation_fn.__name__, "gelu"),
}


@pytest.mark.parametrize("name", OVERRIDES)
def test_model_overrides_the_stock_transformer_takes(layerdrop_checkpoints, name):
    overrides, read, expected = OVERRIDES[name]
    built = {}
    for arch, checkpoint in layerdrop_checkpoints.items():
        # what fairseq-generate and fairseq-interactive call with --model-overrides
        models, _ = checkpoint_utils.load_model_ensemble([str(checkpoint)], arg_overrides=overrides)
        built[arch] = read(models[0])
    assert built == {"transformer_rela": expected, "transformer": expected}


def test_list_options_take_the_strings_fairseq_reads():
    """The options fairseq's code reads as comma-separated strings are merged into the dataclass as they are:
    fairseq-hydra-train's ``model.encoder_layers_to_keep='0,2'`` and checkpoints overridden so."""
    from fairseq.dataclass.utils import merge_with_parent
    from omegaconf import OmegaConf

    from rela_fairseq.settings import RelaTransformerConfig

    for cutoff in ("5000,20000", [5000, 20000]):  # training stores the list, an override may give the string
        merged = merge_with_parent(RelaTransformerConfig(), OmegaConf.create(
            {"_name": "transformer_rela", "adaptive_softmax_cutoff": cutoff, **PRUNED}))
        assert OmegaConf.to_container(merged)["adaptive_softmax_cutoff"] == cutoff
        assert (merged.encoder_layers_to_keep, merged.decoder_layers_to_keep) == ("0,2", "1")
