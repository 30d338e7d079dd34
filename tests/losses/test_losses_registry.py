"""Every SPEC §3 method is registered with what the trainer needs to know about it."""

from __future__ import annotations

import re

import pytest

from unialign.feedback import SLOTS
from unialign.losses import all_methods, check_format, get_method

from .loss_testing import make_cfg

SPEC_METHODS = {
    "una_pair", "una_binary", "una_score", "una_reward", "rao", "tpo", "tpo_l",
    "dpo", "ipo", "hinge", "cal_dpo", "rpo_nll", "distill", "kto", "simpo", "cpo", "orpo", "sft",
    "reward_model",
}
REFERENCE_FREE = {"tpo", "tpo_l", "simpo", "cpo", "orpo", "sft", "reward_model"}


def test_every_spec_method_is_registered():
    names = {m.name for m in all_methods()}
    assert SPEC_METHODS <= names


@pytest.mark.parametrize("name", sorted(SPEC_METHODS))
def test_method_declarations(name):
    method = get_method(name)
    assert method.needs_reference == (name not in REFERENCE_FREE)
    assert method.needs_prompt_logps == (name in ("rao", "orpo"))  # orpo: for its default NLL scope
    assert method.needs_shared_first_token == (name == "rao")
    assert method.needs_kl_pairs == (name == "kto")
    assert method.model_kind == ("sequence_classifier" if name == "reward_model" else "causal_lm")
    assert set(method.formats) <= set(SLOTS)
    assert "learning_rate" in method.defaults
    if name not in {"sft", "reward_model"}:
        assert "beta" in method.defaults
    assert method.summary and method.paper


# A citation names a paper a reader can find: an arXiv id, or the venue where a paper has none.
CITATION = re.compile(r"arXiv:\d{4}\.\d{5}|\(ACL 20\d\d\)")


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.name)
def test_every_method_cites_its_paper_by_a_findable_id(method):
    assert CITATION.search(method.paper), f"{method.name}: {method.paper!r} has no arXiv id or venue"
    assert "papers/" not in method.paper and ".txt" not in method.paper


def test_paper_defaults():
    assert get_method("una_pair").defaults == {"beta": 0.03, "learning_rate": 5e-6}
    assert get_method("una_binary").defaults["beta"] == 0.01
    assert get_method("una_score").defaults["learning_rate"] == 3e-5
    assert get_method("rao").defaults == {"beta": 0.1, "learning_rate": 5e-7, "z0": 50.0}
    assert get_method("tpo").defaults == {"beta": 0.01, "alpha": 1.0, "learning_rate": 5e-7}
    assert get_method("tpo_l").defaults["gamma"] == 0.5
    assert get_method("simpo").defaults["beta"] == 2.0 and get_method("simpo").defaults["gamma"] == 0.5


@pytest.mark.parametrize("alias,name", [("sigmoid", "dpo"), ("slic", "hinge"), ("rpo", "rpo_nll")])
def test_trl_aliases(alias, name):
    assert get_method(alias).name == name


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_method("not_a_method")
    message = str(err.value)
    assert "not_a_method" in message
    for name in SPEC_METHODS:
        assert name in message


@pytest.mark.parametrize("name,data_format,converter", [
    ("tpo", "pairwise", "--to triple"),
    ("rao", "pairwise", "--to listwise"),
    ("kto", "score", "--to binary"),
    ("dpo", "listwise", "--to pairwise"),
    ("una_score", "binary", "--to score"),
])
def test_wrong_format_names_the_converter(name, data_format, converter):
    method = get_method(name)
    with pytest.raises(ValueError, match=converter):
        check_format(method, data_format)


def test_accepted_formats_pass():
    check_format(get_method("sft"), "triple")
    check_format(get_method("una_binary"), "pairwise")
    check_format(get_method("kto"), "binary")


def test_targets_are_requested_where_used():
    assert get_method("una_binary").targets_from == "labels"
    assert get_method("kto").targets_from == "labels"
    assert get_method("una_score").targets_from == "scores"
    assert get_method("dpo").targets_from is None


@pytest.mark.parametrize("scope,needs_prompt", [("prompt_and_completion", True), ("completion", False)])
def test_orpo_needs_prompt_logps_only_for_an_nll_over_the_prompt(scope, needs_prompt):
    method = get_method("orpo").for_config(make_cfg(orpo_nll_scope=scope))
    assert method.needs_prompt_logps is needs_prompt
    assert not method.needs_shared_first_token  # unlike RAO, ORPO's prompts may start with any token


def test_methods_without_config_dependent_needs_are_their_own_declaration():
    dpo = get_method("dpo")
    assert dpo.for_config(make_cfg()) is dpo
