"""NBD wire constants: magics, options, replies, commands, flags, limits
and the struct layouts of every header (NetworkBlockDevice/nbd doc/proto.md;
extended headers from its extension-ext-header branch)."""

from __future__ import annotations

import enum
import struct

# --- magics-------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Handshake flags (server) and client flags share bit values.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009
    ERR_EXT_HEADER_REQD = 0x8000000A


REP_ERROR_BIT = 1 << 31


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class TxFlag(enum.IntFlag):
    """Transmission flags of an export (NBD_FLAG_*)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_ERROR_BIT = 1 << 15

# Metadata contexts this client understands.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# --- limits-------------------------------------------------------------------

#: Largest option reply payload accepted. Replies carry names and messages,
#: which the protocol caps at 4096 bytes; a bigger length is a broken server.
MAX_OPTION_REPLY = 64 * 1024

#: The payload every server must accept when it advertises no maximum
#: (doc/proto.md "Block size constraints").
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024

#: Descriptors accepted in one block status chunk. The protocol says a
#: server SHOULD NOT send more than 2^20; this bounds a reply to 8 MiB
#: (16 MiB with extended headers).
MAX_DESCRIPTORS = 1 << 20

#: Largest error chunk payload: error, message length, a message of at most
#: 4096 bytes (the protocol's string limit), and an optional offset.
MAX_ERROR_PAYLOAD = 4 + 2 + 4096 + 8

#: Block sizes a server may advertise: a minimum above 64 KiB is invalid
#: by the protocol.
MAX_MIN_BLOCK_SIZE = 64 * 1024

GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
EXT_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
EXT_REPLY = struct.Struct(">IHHQQQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HOLE = struct.Struct(">QI")
ERROR = struct.Struct(">IH")
DESC = struct.Struct(">II")
EXT_DESC = struct.Struct(">QQ")

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
