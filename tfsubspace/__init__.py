"""tfsubspace: compress trained Keras CNNs into small, fast .tflite models.

The public API lives here. Names are imported on first use, so `import tfsubspace` stays
cheap and does not import TensorFlow until something needs it.
"""

from __future__ import annotations

import importlib

from tfsubspace.errors import DataError as DataError
from tfsubspace.errors import DataFileError as DataFileError
from tfsubspace.errors import DataMismatchWarning as DataMismatchWarning
from tfsubspace.errors import DatasetNotAvailableError as DatasetNotAvailableError
from tfsubspace.errors import TfSubspaceError as TfSubspaceError
from tfsubspace.errors import UnsupportedModelError as UnsupportedModelError
from tfsubspace.errors import WorkDirError as WorkDirError

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself.
_LAZY = {
    "data": ("tfsubspace.data", None),
    "models": ("tfsubspace.models", None),
    "stats": ("tfsubspace.models.stats", None),
    "load_dataset": ("tfsubspace.data", "load"),
    "dataset_info": ("tfsubspace.data", "dataset_info"),
    "fetch_data": ("tfsubspace.data.fetch", "fetch"),
    "count_params": ("tfsubspace.models.stats", "count_params"),
    "count_macs": ("tfsubspace.models.stats", "count_macs"),
    "layer_stats": ("tfsubspace.models.stats", "layer_stats"),
    "train_classifier": ("tfsubspace.train.classifier", "train_classifier"),
    "EpochCheckpoint": ("tfsubspace.train.checkpoint", "EpochCheckpoint"),
    "channels": ("tfsubspace.prune.channels", None),
    "register_layer_handler": ("tfsubspace.prune.channels", "register"),
    "analyze": ("tfsubspace.prune.analysis", "analyze"),
    "ChannelAnalysis": ("tfsubspace.prune.analysis", "ChannelAnalysis"),
    "PruningPlan": ("tfsubspace.prune.plan", "PruningPlan"),
    "PlanError": ("tfsubspace.prune.plan", "PlanError"),
    "VerificationError": ("tfsubspace.prune.surgery", "VerificationError"),
    "apply_plan": ("tfsubspace.prune.surgery", "apply_plan"),
    "SurgeryResult": ("tfsubspace.prune.surgery", "SurgeryResult"),
    "masked_predict": ("tfsubspace.prune.surgery", "masked_predict"),
    "plan_params": ("tfsubspace.prune.surgery", "plan_params"),
    "layer_report": ("tfsubspace.prune.surgery", "layer_report"),
    "format_layer_report": ("tfsubspace.prune.surgery", "format_report"),
    "load_model": ("tfsubspace.fileio", "load_model"),
    "regularizers": ("tfsubspace.distill.regularizers", None),
    "ranking": ("tfsubspace.prune.ranking", None),
    "plan_for_budget": ("tfsubspace.prune.ranking", "plan_for_budget"),
    "baselines": ("tfsubspace.peers.baselines", None),
    "bridge": ("tfsubspace.peers.bridge", None),
    "compress": ("tfsubspace.distill.pipeline", "compress"),
    "CompressionConfig": ("tfsubspace.distill.pipeline", "CompressionConfig"),
    "CompressionResult": ("tfsubspace.distill.pipeline", "CompressionResult"),
    "evaluate": ("tfsubspace.distill.report", "evaluate"),
    "format_report": ("tfsubspace.distill.report", "format_report"),
    "StudentTrainer": ("tfsubspace.distill.trainer", "StudentTrainer"),
    "build_student": ("tfsubspace.distill.student", "build_student"),
    "reestimate_batchnorm": ("tfsubspace.distill.batchnorm", "reestimate_batchnorm"),
    "batchnorm_mismatch": ("tfsubspace.distill.batchnorm", "batchnorm_mismatch"),
    "adapt_images": ("tfsubspace.distill.adapt", "adapt_images"),
    "batchnorm_distance": ("tfsubspace.distill.adapt", "batchnorm_distance"),
    "latent_statistics": ("tfsubspace.distill.subspace", "latent_statistics"),
    "choose_dimensions": ("tfsubspace.distill.subspace", "choose_dimensions"),
    "export_tflite": ("tfsubspace.edge.export", "export"),
    "ExportedModel": ("tfsubspace.edge.export", "ExportedModel"),
    "export_qat": ("tfsubspace.edge.qat", "export_qat"),
    "int8_steps": ("tfsubspace.edge.autoint8", "int8_steps"),
    "fold_batchnorm": ("tfsubspace.edge.fold", "fold_batchnorm"),
    "equalize": ("tfsubspace.edge.equalize", "equalize"),
    "correct_biases": ("tfsubspace.edge.biascorrect", "correct_biases"),
    "diagnose_int8": ("tfsubspace.edge.diagnose", "diagnose"),
    "edgetpu_check": ("tfsubspace.edge.edgetpu", "edgetpu_check"),
    "micro_arena_bytes": ("tfsubspace.edge.micro", "micro_arena_bytes"),
    "write_c_array": ("tfsubspace.edge.micro", "write_c_array"),
    "benchmark": ("tfsubspace.edge.measure", "benchmark"),
    "measure_files": ("tfsubspace.edge.latency", "measure_files"),
    "BenchEntry": ("tfsubspace.edge.measure", "BenchEntry"),
}

_ERRORS = [
    "DataError",
    "DataFileError",
    "DataMismatchWarning",
    "DatasetNotAvailableError",
    "TfSubspaceError",
    "UnsupportedModelError",
    "WorkDirError",
]
__all__ = sorted([*_ERRORS, "__version__", *_LAZY])  # every public name, once


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
