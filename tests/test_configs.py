"""Method configs: one dataclass per method is the single source of its options."""

import pytest

from lora_diffusion.errors import UserError
from lora_diffusion.methods import METHODS, make_method, method_config, option_specs, parse_option_pairs


@pytest.mark.parametrize("name", list(METHODS))
def test_every_option_has_help_and_its_default_round_trips(name):
    config = method_config(name)
    for spec in option_specs(name):
        assert spec.help, f"{name}.{spec.name} has no help text"
    assert method_config(name, config.to_dict()) == config  # what adapter_config.json stores reloads as itself
    assert METHODS[name].Config.method == name


def test_text_from_the_command_line_is_read_by_type():
    config = method_config("lora_diffusion", parse_option_pairs(
        ["ranks=16,8,4", "k=1", "lambda_rank=0", "condition=false", "scales=[1, 1, 1]", "injection=blocks"]))
    assert config.ranks == (16, 8, 4) and config.k == 1 and config.lambda_rank == 0.0
    assert config.condition is False and config.scales == (1.0, 1.0, 1.0) and config.injection == "blocks"
    assert method_config("lora", {"r": "8"}).r == 8
    assert method_config("lora", {"r": 8.0}).r == 8  # a whole number from JSON or a number box


def test_derived_options_are_resolved_once_in_the_config():
    assert method_config("lora_diffusion").phase_ranks() == (64, 32, 8)
    assert method_config("lora_diffusion", {"schedule": "inverted"}).phase_ranks() == (8, 32, 64)
    assert method_config("lora_diffusion", {"schedule": "uniform", "rank": 4}).phase_ranks() == (4, 4, 4)
    assert method_config("lora_diffusion", {"ranks": "2,3,4", "schedule": "uniform"}).phase_ranks() == (2, 3, 4)
    assert method_config("lora", {"r": 4}).lora_alpha() == 8.0 and method_config("lora", {"r": 4, "alpha": 3}).lora_alpha() == 3.0
    assert method_config("lora", {"r": 4}).alpha is None  # derived, not stored: a config with r = 8 has alpha 16
    assert method_config("lora_diffusion", {"injection": "blocks"}).default_lr() == 3e-4
    assert method_config("prefix", {"reparam": False}).default_lr() == 1e-2


@pytest.mark.parametrize("name, options, words", [
    ("lora", {"r": "1.5"}, ["'lora'", "'r'", "an integer in [1, 1024]", "'1.5'"]),
    ("lora", {"r": 0}, ["'r'", "in [1, 1024]"]),
    ("lora", {"r": "abc"}, ["'r'", "an integer"]),
    ("lora", {"r": True}, ["'r'", "an integer"]),
    ("lora", {"dropout": 1.5}, ["'dropout'", "in [0.0, 1.0]"]),
    ("lora", {"targets": "everything"}, ["'targets'", "'attention' or 'attention+mlp'"]),
    ("lora_diffusion", {"lambda_rank": "nan"}, ["'lambda_rank'", "finite"]),
    ("lora_diffusion", {"lambda_orth": "inf"}, ["'lambda_orth'", "finite"]),
    ("lora_diffusion", {"ranks": "16,16"}, ["'ranks'", "3 comma-separated values"]),
    ("lora_diffusion", {"ranks": "16,0,16"}, ["'ranks'", "[1, 1024]"]),
    ("lora_diffusion", {"injection": "middle"}, ["'injection'", "'final' or 'blocks' or 'weights'"]),
    ("lora_diffusion", {"time_dim": 63}, ["'time_dim'", "even"]),
    ("lora_diffusion", {"condition": "maybe"}, ["'condition'", "true or false"]),
    ("prefix", {"init": "zeros"}, ["'init'", "'words' or 'random'"]),
    ("adapter", {"bottleneck": -1}, ["'bottleneck'", "in [1, 4096]"]),
    ("lora", {"rank": 4}, ["has no option 'rank'", "its options: r, alpha, dropout, targets"]),
    ("full", {"r": 4}, ["'full' has no option 'r'", "its options: none"]),
])
def test_a_wrong_option_names_the_method_the_field_and_what_it_accepts(name, options, words):
    with pytest.raises(UserError) as error:
        make_method(name, options)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_option_pairs_must_be_key_value():
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_option_pairs(["r8"])
