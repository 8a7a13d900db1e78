"""icl-ser: few-shot personalized speech emotion recognition by in-context learning.

This folder is the model alone: the config, the model and its parts (one job per file), the
processor, pipeline and audio decoding a Hub checkpoint carries (``save_pretrained`` copies them
beside the weights; ``checkpointing.checkpoint_code_files`` lists them), plus the backbone
loaders (``backbones``, ``ctranslate2_whisper``) and the tiny random test model (``testing``). It imports nothing from
the layers above it (``dataset_builder``, ``evaluation``, the scripts; tests/test_layout.py).

Importing the package registers the model with the transformers Auto classes, and marks the
config, model and processor for `register_for_auto_class`, so `save_pretrained` writes an
`auto_map` and copies the code files next to the weights (load with `trust_remote_code=True`).
It also registers the `"icl-speech-emotion"` pipeline; a checkpoint saved with
`model.save_pretrained` (or `save_with_pipeline`, model and processor in one call) carries it
(see the README).
"""

from .audio_utils import check_torchaudio, load_audio

check_torchaudio()  # before transformers loads torchaudio: a clear error instead of a linker message

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor  # noqa: E402
from .configuration_icl_ser import DEFAULT_LABELS, IclSerConfig
from .modeling_icl_ser import IclSerForConditionalGeneration, IclSerPreTrainedModel
from .pipeline_icl_ser import (
    IclSpeechEmotionPipeline,
    SpeakerProfile,
    plot_emotion_timeline,
    register_pipeline,
    save_with_pipeline,
)
from .processing_icl_ser import IclSerDataCollator, IclSerProcessor
from .projector import IclSerProjector
from .route_mixing import mix_routes
from .recording_outputs_icl_ser import segments_to_csv, segments_to_json, summarize_recording

AutoConfig.register(IclSerConfig.model_type, IclSerConfig, exist_ok=True)
AutoModel.register(IclSerConfig, IclSerForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(IclSerConfig, IclSerForConditionalGeneration, exist_ok=True)
AutoProcessor.register(IclSerConfig, IclSerProcessor, exist_ok=True)

IclSerConfig.register_for_auto_class()
IclSerForConditionalGeneration.register_for_auto_class("AutoModel")
IclSerProcessor.register_for_auto_class()
register_pipeline()

__all__ = [
    "DEFAULT_LABELS",
    "IclSerConfig",
    "IclSerDataCollator",
    "IclSerForConditionalGeneration",
    "IclSerPreTrainedModel",
    "IclSerProcessor",
    "IclSerProjector",
    "IclSpeechEmotionPipeline",
    "SpeakerProfile",
    "load_audio",
    "mix_routes",
    "plot_emotion_timeline",
    "save_with_pipeline",
    "segments_to_csv",
    "segments_to_json",
    "summarize_recording",
]
