"""What the attacker sees and what only the data party knows: recordings and ground truth.

Attacks (``privacy/attacks``) read a :class:`RecordingReader` and are scored against a
:class:`GroundTruthReader`; defenses (``privacy/defenses``) change what gets recorded.
"""

from splitfed.privacy.recording import (
    BatchTruth,
    GenerationTruth,
    GroundTruthReader,
    GroundTruthWriter,
    Record,
    RecordingError,
    RecordingReader,
    RecordingWriter,
    TensorInfo,
    check_new_recording,
    ground_truth_dir,
    phase_of,
)

__all__ = [
    "BatchTruth",
    "GenerationTruth",
    "GroundTruthReader",
    "GroundTruthWriter",
    "Record",
    "RecordingError",
    "RecordingReader",
    "RecordingWriter",
    "TensorInfo",
    "check_new_recording",
    "ground_truth_dir",
    "phase_of",
]
