from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorProto(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "data", "scale", "indices", "external")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    data: bytes
    scale: bytes
    indices: bytes
    external: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., data: _Optional[bytes] = ..., scale: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., external: _Optional[int] = ...) -> None: ...

class MetaValue(_message.Message):
    __slots__ = ("i", "f", "s", "b")
    I_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    i: int
    f: float
    s: str
    b: bool
    def __init__(self, i: _Optional[int] = ..., f: _Optional[float] = ..., s: _Optional[str] = ..., b: _Optional[bool] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("kind", "tensors", "meta", "seq", "error", "code")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetaValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetaValue, _Mapping]] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorProto]
    meta: _containers.MessageMap[str, MetaValue]
    seq: int
    error: str
    code: str
    def __init__(self, kind: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorProto, _Mapping]]] = ..., meta: _Optional[_Mapping[str, MetaValue]] = ..., seq: _Optional[int] = ..., error: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("message_id", "index", "total", "payload", "header_frames")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADER_FRAMES_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    index: int
    total: int
    payload: bytes
    header_frames: int
    def __init__(self, message_id: _Optional[int] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., payload: _Optional[bytes] = ..., header_frames: _Optional[int] = ...) -> None: ...
