"""What `csrc/bindings.cpp` binds, as a type: `cpu_ops()` returns the compiled module typed as `CpuOps`.

Keep it in step with the `m.def` lines of csrc/bindings.cpp and the declarations in csrc/ops.h
(tests/test_kernels.py checks the names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor


class CpuOps(Protocol):
    def paged_decode_attention(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        tables: Tensor,
        lens: Tensor,
        block_size: int,
        scale: float,
        /,
    ) -> Tensor: ...

    def add_rms_norm(self, x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, /) -> Tensor: ...

    def silu_mul(self, gate_up: Tensor, /) -> Tensor: ...

    def rope_qkv(
        self,
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        heads: int,
        kv_heads: int,
        slots: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        /,
    ) -> list[Tensor]: ...

    def amx_available(self) -> bool: ...

    def argmax_rows(self, x: Tensor, /) -> Tensor: ...

    def decode_layers(
        self,
        x: Tensor,
        norms: list[Tensor],
        tiles: list[Tensor],
        qkv_bias: list[Tensor],
        cos: Tensor,
        sin: Tensor,
        slots: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        tables: Tensor,
        lens: Tensor,
        block_size: int,
        heads: int,
        scale: float,
        eps: float,
        /,
    ) -> None: ...

    def amx_pack(self, w: Tensor, gate_up: bool = False) -> Tensor: ...

    def amx_linear(self, x: Tensor, packed: Tensor, bias: Tensor | None, /) -> Tensor: ...

    def amx_pack_q4(self, q: Tensor, scale: Tensor, zero: Tensor, gate_up: bool = False) -> Tensor: ...

    def amx_linear_q4(self, x: Tensor, packed: Tensor, bias: Tensor | None, /) -> Tensor: ...

    def amx_silu_mul(self, x: Tensor, packed: Tensor, /) -> Tensor: ...

    def amx_pack_q8(self, q: Tensor, scale: Tensor, /) -> Tensor: ...

    def amx_linear_q8(self, x: Tensor, packed: Tensor, bias: Tensor | None, /) -> Tensor: ...
