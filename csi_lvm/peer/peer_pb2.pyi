from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ("source_id", "target_id")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    target_id: str
    def __init__(self, source_id: _Optional[str] = ..., target_id: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("capacity_bytes", "thin")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    THIN_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    thin: bool
    def __init__(self, capacity_bytes: _Optional[int] = ..., thin: _Optional[bool] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("source_id", "target_id", "starting_offset")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    STARTING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    target_id: str
    starting_offset: int
    def __init__(self, source_id: _Optional[str] = ..., target_id: _Optional[str] = ..., starting_offset: _Optional[int] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("byte_offset", "data", "crc32", "done", "total_bytes", "point_in_time")
    BYTE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POINT_IN_TIME_FIELD_NUMBER: _ClassVar[int]
    byte_offset: int
    data: bytes
    crc32: int
    done: bool
    total_bytes: int
    point_in_time: str
    def __init__(self, byte_offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., done: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., point_in_time: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("source_id", "target_id")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    target_id: str
    def __init__(self, source_id: _Optional[str] = ..., target_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
