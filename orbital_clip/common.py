"""Temporary: removed at merge. The names common.py had, re-exported from the modules that now
hold them (images, cohort, cli, models, checkpoint, outputs, zero_shot), so that files not yet
switched keep working; /work/rewrite_common.py rewrites their references and deletes this file.
"""

import os  # tests patch common.os (os.fsync, os.cpu_count): the same os module
import sys
import types

from orbital_clip.images import (  # temporary: removed at merge
    IMAGE_EXTENSIONS, DICOM_EXTENSIONS, SIDECAR_EXTENSIONS, NOT_IMAGE_EXTENSIONS,
    UNSUPPORTED_FORMAT, UNRECOGNISED, JUNK_NAMES, MAX_IMAGE_PIXELS, ImageReadError,
    is_os_metadata_file, is_junk_file, is_candidate_image, has_listed_extension,
    unsupported_format_files, read_image, DICOM_PHOTOMETRIC, DICOM_PIXEL_KEYWORDS, file_sha256,
    manifest_sha256, overlapping_images
)
from orbital_clip.cohort import (  # temporary: removed at merge
    SPLIT_NAMES, CohortError, edit_distance, did_you_mean, did_you_mean_clause,
    list_class_folder_images, regex_group, STEM_GROUPS_REASON, manifest_patient_groups,
    read_manifest, load_labelled_items, ImageListDataset, read_failures
)
from orbital_clip.cli import (  # temporary: removed at merge
    seed_worker, default_workers, show_defaults, configure_logging
)
from orbital_clip.models import (  # temporary: removed at merge
    MODEL_SCHEMAS, resolve_device, cpu_native_bf16, resolve_precision, autocast_context,
    register_model_config, register_model_config_dict, model_source, config_alias,
    close_model_names, read_model_config, local_dir_weights, check_optional_packages,
    MissingPackageError, create_model, pretrained_hub_files, hub_unreachable,
    offline_weights_problem, preprocess_overrides, model_preprocess_cfg, model_image_size
)
from orbital_clip.checkpoint import (  # temporary: removed at merge
    CHECKPOINT_FORMAT, CheckpointError, clean_state_dict, load_checkpoint_file,
    load_weights_into, load_state_dict_file, checkpoint_state_dict, interpolate_state_dicts,
    save_checkpoint, save_safetensors
)
from orbital_clip.outputs import (  # temporary: removed at merge
    OutputWriteError, atomic_write, atomic_write_text, atomic_write_json, atomic_write_csv,
    atomic_save_figure, environment_info, plain, hide_flag_values, run_record
)
from orbital_clip.zero_shot import (  # temporary: removed at merge
    build_zero_shot_classifier, zero_shot_logits, image_encoder, encode_image_batches
)

OWNER = {name: module for module, names in (
    ('images', ('IMAGE_EXTENSIONS', 'DICOM_EXTENSIONS', 'SIDECAR_EXTENSIONS', 'NOT_IMAGE_EXTENSIONS', 'UNSUPPORTED_FORMAT', 'UNRECOGNISED', 'JUNK_NAMES', 'MAX_IMAGE_PIXELS', 'ImageReadError', 'is_os_metadata_file', 'is_junk_file', 'is_candidate_image', 'has_listed_extension', 'unsupported_format_files', 'read_image', 'DICOM_PHOTOMETRIC', 'DICOM_PIXEL_KEYWORDS', 'file_sha256', 'manifest_sha256', 'overlapping_images')),
    ('cohort', ('SPLIT_NAMES', 'CohortError', 'edit_distance', 'did_you_mean', 'did_you_mean_clause', 'list_class_folder_images', 'regex_group', 'STEM_GROUPS_REASON', 'manifest_patient_groups', 'read_manifest', 'load_labelled_items', 'ImageListDataset', 'read_failures')),
    ('cli', ('seed_worker', 'default_workers', 'show_defaults', 'configure_logging')),
    ('models', ('MODEL_SCHEMAS', 'resolve_device', 'cpu_native_bf16', 'resolve_precision', 'autocast_context', 'register_model_config', 'register_model_config_dict', 'model_source', 'config_alias', 'close_model_names', 'read_model_config', 'local_dir_weights', 'check_optional_packages', 'MissingPackageError', 'create_model', 'pretrained_hub_files', 'hub_unreachable', 'offline_weights_problem', 'preprocess_overrides', 'model_preprocess_cfg', 'model_image_size')),
    ('checkpoint', ('CHECKPOINT_FORMAT', 'CheckpointError', 'clean_state_dict', 'load_checkpoint_file', 'load_weights_into', 'load_state_dict_file', 'checkpoint_state_dict', 'interpolate_state_dicts', 'save_checkpoint', 'save_safetensors')),
    ('outputs', ('OutputWriteError', 'atomic_write', 'atomic_write_text', 'atomic_write_json', 'atomic_write_csv', 'atomic_save_figure', 'environment_info', 'plain', 'hide_flag_values', 'run_record')),
    ('zero_shot', ('build_zero_shot_classifier', 'zero_shot_logits', 'image_encoder', 'encode_image_batches')),
) for name in names}


class _Forwarding(types.ModuleType):
    """monkeypatch.setattr(common, NAME, ...) patches the module that owns NAME, whose functions
    read it (resolve_precision reads models.cpu_native_bf16), as it did when common held them."""

    def __setattr__(self, name, value):
        if name in OWNER:
            setattr(sys.modules[f"orbital_clip.{OWNER[name]}"], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Forwarding
