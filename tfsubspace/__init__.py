"""tfsubspace: compress trained Keras CNNs into small, fast .tflite models.

The public API lives here. Names are imported on first use, so `import tfsubspace` stays
cheap and does not import TensorFlow until something needs it.
"""

from __future__ import annotations

import importlib

from tfsubspace.errors import (
    DataError,
    DataFileError,
    DataMismatchWarning,
    DatasetNotAvailableError,
    TfSubspaceError,
    UnsupportedModelError,
    WorkDirError,
)

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself.
_LAZY = {
    "data": ("tfsubspace.data", None),
    "models": ("tfsubspace.models", None),
    "stats": ("tfsubspace.stats", None),
    "load_dataset": ("tfsubspace.data", "load"),
    "dataset_info": ("tfsubspace.data", "dataset_info"),
    "fetch_data": ("tfsubspace.fetch", "fetch"),
    "count_params": ("tfsubspace.stats", "count_params"),
    "count_macs": ("tfsubspace.stats", "count_macs"),
    "layer_stats": ("tfsubspace.stats", "layer_stats"),
    "train_classifier": ("tfsubspace.training", "train_classifier"),
    "EpochCheckpoint": ("tfsubspace.checkpoint", "EpochCheckpoint"),
    "channels": ("tfsubspace.channels", None),
    "register_layer_handler": ("tfsubspace.channels", "register"),
    "analyze": ("tfsubspace.analysis", "analyze"),
    "ChannelAnalysis": ("tfsubspace.analysis", "ChannelAnalysis"),
    "PruningPlan": ("tfsubspace.surgery", "PruningPlan"),
    "PlanError": ("tfsubspace.surgery", "PlanError"),
    "VerificationError": ("tfsubspace.surgery", "VerificationError"),
    "apply_plan": ("tfsubspace.surgery", "apply_plan"),
    "masked_predict": ("tfsubspace.surgery", "masked_predict"),
    "plan_params": ("tfsubspace.surgery", "plan_params"),
    "layer_report": ("tfsubspace.surgery", "layer_report"),
    "format_report": ("tfsubspace.surgery", "format_report"),
    "load_model": ("tfsubspace.fileio", "load_model"),
    "regularizers": ("tfsubspace.regularizers", None),
    "ranking": ("tfsubspace.ranking", None),
    "plan_for_budget": ("tfsubspace.ranking", "plan_for_budget"),
    "baselines": ("tfsubspace.baselines", None),
    "bridge": ("tfsubspace.bridge", None),
    "compress": ("tfsubspace.pipeline", "compress"),
    "CompressionConfig": ("tfsubspace.pipeline", "CompressionConfig"),
    "CompressionResult": ("tfsubspace.pipeline", "CompressionResult"),
    "evaluate": ("tfsubspace.pipeline", "evaluate"),
    "StudentTrainer": ("tfsubspace.distill", "StudentTrainer"),
    "build_student": ("tfsubspace.student", "build_student"),
    "reestimate_batchnorm": ("tfsubspace.student", "reestimate_batchnorm"),
    "batchnorm_mismatch": ("tfsubspace.student", "batchnorm_mismatch"),
    "latent_statistics": ("tfsubspace.subspace", "latent_statistics"),
    "choose_dimensions": ("tfsubspace.subspace", "choose_dimensions"),
    "export_tflite": ("tfsubspace.export", "export"),
    "export": ("tfsubspace.export", None),
    "export_qat": ("tfsubspace.export", "export_qat"),
    "edgetpu_check": ("tfsubspace.export", "edgetpu_check"),
    "micro_arena_bytes": ("tfsubspace.export", "micro_arena_bytes"),
    "write_c_array": ("tfsubspace.export", "write_c_array"),
    "benchmark": ("tfsubspace.edgebench", "benchmark"),
    "BenchEntry": ("tfsubspace.edgebench", "BenchEntry"),
}

__all__ = sorted(
    ["DataError", "DataFileError", "DataMismatchWarning", "DatasetNotAvailableError", "TfSubspaceError",
     "UnsupportedModelError", "WorkDirError", "__version__"]
    + list(_LAZY)
)


def __getattr__(name: str):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tfsubspace' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return __all__
