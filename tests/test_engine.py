"""The build engine (`gkd.engine`) knows no ML and takes its stage graph as an argument; the pipeline's stages
(`gkd.stages.STAGES`) are declared once each, in the order their files impose."""

import subprocess
import sys

import pytest

from gkd.engine import Stage, downstream, order
from gkd.recipe import load_recipe, merge, parse_recipe
from gkd.stages import STAGES
from gkd.stages.distill import PHASES
from tests.helpers.paths import REPO, TINY_RECIPE

ORDER = [
    "train-teacher",
    "distill",
    "train-head",
    "train-frozen-head",
    "train-ceiling-head",
    "train-no-kd",
    "evaluate",
    "export",
    "benchmark",
    "report",
]


def test_the_engine_imports_no_torch():
    code = "import sys, gkd.engine; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('gkd.')))"
    modules = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert modules.stdout.strip() == "['gkd.engine', 'gkd.utils', 'gkd.utils.errors', 'gkd.utils.io']"


def _recipe(schedule: str):
    """The tiny recipe on GKD's two-stage schedule or on the baselines' one joint stage."""
    joint = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}
    overrides = {"distill": {"schedule": schedule, "joint": joint if schedule == "one_stage" else None}}
    return parse_recipe(merge(load_recipe(TINY_RECIPE).model_dump(mode="json"), overrides))


@pytest.mark.parametrize("schedule", ["two_stage", "one_stage"])
def test_build_order_is_the_declared_order_and_follows_the_files(schedule):
    recipe = _recipe(schedule)
    assert [stage.name for stage in STAGES] == ORDER
    assert [stage.name for stage in order(STAGES, recipe)] == ORDER
    shuffled = order(tuple(reversed(STAGES)), recipe)  # another declaration order: still producers first
    for index, stage in enumerate(shuffled):
        later = {f for s in shuffled[index:] for f in (*s.outputs(recipe), *s.side_outputs) if s is not stage}
        assert not later & set(stage.consumed_files(recipe)), stage.name


def test_stages_that_read_each_other_are_an_error():
    recipe = load_recipe(TINY_RECIPE)
    a = Stage("a", lambda run: None, lambda r: ("a.json",), inputs=lambda r: ("b.json",))
    b = Stage("b", lambda run: None, lambda r: ("b.json",), inputs=lambda r: ("a.json",))
    with pytest.raises(ValueError, match="consume each other's files"):
        order((a, b), recipe)


def test_downstream_follows_the_graph_it_is_given():
    recipe = load_recipe(TINY_RECIPE)
    first = Stage("first", lambda run: None, lambda r: ("first.json",))
    second = Stage("second", lambda run: None, lambda r: ("second.json",), inputs=lambda r: ("first.json",))
    assert downstream((second, first), recipe, ("first",)) == {"first", "second"}
    assert downstream((second, first), recipe, ("second",)) == {"second"}


def test_distill_phases_are_declared_once():
    recipe = _recipe("two_stage")
    distill = next(stage for stage in STAGES if stage.name == "distill")
    trainings = [use.name for use in distill.trainings(recipe)]
    assert trainings == [phase.name for phase in PHASES] == ["distill_task_agnostic", "distill_domain_agnostic"]
    assert [use.role for use in distill.data(recipe)] == ["proxy", "source"]
    assert distill.sections[-4:] == ("data.proxy", "data.proxy_transform", "data.distill_transform", "distill")
    assert [use.name for use in distill.trainings(_recipe("one_stage"))] == ["distill_joint"]
