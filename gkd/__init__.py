"""gkd-compress: generalizable knowledge distillation from vision foundation models for segmentation.

The public API (the ``gkd-compress`` command is argument parsing over it)::

    import gkd

    recipe = gkd.load_recipe("recipes/smoke.yaml", overrides=["seed=1"])
    pipeline = gkd.Pipeline(recipe, out="runs/smoke")
    print(pipeline.plan())                 # what would run; every input checked; nothing trained
    result = pipeline.run()                # distil, train the head, evaluate, export, benchmark, report
    predictor = gkd.Predictor.from_run("runs/smoke", runtime="onnxruntime")
    labels = predictor.predict(images)     # class ids at each image's own size

Names are imported on first use, so ``import gkd`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# module -> its public names, ``public=attribute`` where the name differs from the module's
_MODULES = {
    "gkd.recipe": "Recipe load_recipe",
    "gkd.pipeline": "Pipeline RunResult",
    "gkd.plan": "Plan",
    "gkd.predictor": "Predictor load_segmentor=load_run_segmentor",
    "gkd.predict": "predict_files=predict",
    "gkd.compare": "compare_methods",
    "gkd.sweep": "sweep_students",
    "gkd.models.zoo": "list_models=zoo_rows",
    "gkd.stages": "STAGES",
}
_API = {  # public name -> (module, attribute)
    public: (module, attribute or public)
    for module, names in _MODULES.items()
    for public, _, attribute in (name.partition("=") for name in names.split())
}
__all__ = [
    "STAGES",
    "Pipeline",
    "Plan",
    "Predictor",
    "Recipe",
    "RunResult",
    "__version__",
    "compare_methods",
    "list_models",
    "load_recipe",
    "load_segmentor",
    "predict_files",
    "sweep_students",
]

if TYPE_CHECKING:  # the names for type checkers and IDEs
    from gkd.compare import compare_methods
    from gkd.models.zoo import zoo_rows as list_models
    from gkd.pipeline import Pipeline, RunResult
    from gkd.plan import Plan
    from gkd.predict import predict as predict_files
    from gkd.predictor import Predictor
    from gkd.predictor import load_run_segmentor as load_segmentor
    from gkd.recipe import Recipe, load_recipe
    from gkd.stages import STAGES
    from gkd.sweep import sweep_students


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'gkd' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # cached: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
