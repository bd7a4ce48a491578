"""The server's listening sockets, built for a hand-over: bound with SO_REUSEPORT so a new process can
listen on the port of one still running, new connections steered to the newest listener, and the
accept queue of a listener that is about to close watched until it is empty (Linux; elsewhere plain)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
import sys

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h; Python's socket module does not name it
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return this constant"
_LISTEN = "0A"  # TCP_LISTEN as /proc/net/tcp writes it


def listen(host: str | None, port: int, *, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address `host` names (all of them for None or "")."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            if reuse_port:
                steer_to_newest(sock)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def steer_to_newest(sock: socket.socket) -> bool:
    """Make the kernel give new connections on this port to the newest of (at most) two listeners.

    Without it, SO_REUSEPORT spreads new connections over every listener by a hash, so the old process
    keeps receiving them until it closes its socket, and closing a listener resets the connections
    still waiting in its accept queue (unless net.ipv4.tcp_migrate_req is on, which needs root). A
    classic BPF program, which any process may attach, picks the listener by its index in the port's
    group: 1 is the second to join, the newcomer during a hand-over; when it is the only one left, index
    1 does not exist and the kernel falls back to its hash. Attached after listen(): a program attached
    before joins no group and is dropped."""
    if not sys.platform.startswith("linux"):
        return False
    instruction = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, 1))
    program = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(instruction))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)
    except OSError as exc:
        log.debug("cannot steer new connections to the newest listener: %s", exc)
        return False
    return True


def accept_queue_length(sock: socket.socket) -> int:
    """Connections the kernel has set up that this listener has not accepted yet (Linux: TCP_INFO's
    tcpi_unacked, which a listening socket fills with its accept queue's length); 0 where unknown."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or sock.fileno() < 0:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
    except OSError:
        return 0
    return struct.unpack_from("=I", info, 24)[0] if len(info) >= 28 else 0


def other_listeners(sock: socket.socket) -> int:
    """How many other sockets listen on this socket's address and port (a successor taking it over),
    read from /proc/net/tcp; 0 where that cannot be read."""
    host, port = sock.getsockname()[:2]
    family = sock.family
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    try:
        ours = os.fstat(sock.fileno()).st_ino
        with open(table) as f:
            lines = f.readlines()[1:]
    except OSError:
        return 0
    wanted = socket.inet_pton(family, host)
    others = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN or int(fields[9]) == ours:
            continue
        address, _, port_hex = fields[1].partition(":")
        if int(port_hex, 16) == port and _proc_address(address) == wanted:
            others += 1
    return others


def _proc_address(text: str) -> bytes:
    """/proc/net/tcp writes an address as 32-bit words in the machine's byte order."""
    with contextlib.suppress(ValueError):
        return b"".join(struct.pack("=I", int(text[i : i + 8], 16)) for i in range(0, len(text), 8))
    return b""
