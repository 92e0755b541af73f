"""A small textual LLVM IR writer: fresh SSA names, blocks, and loops over stack variables (the
optimizer's mem2reg turns them into registers), so kernels read as straight-line code."""
from __future__ import annotations

import contextlib
import struct

I32, I64 = "i32", "i64"


def f32(x: float) -> str:
    """An LLVM float literal (exactly the float32 value, in LLVM's double hex form)."""
    v = struct.unpack("<f", struct.pack("<f", float(x)))[0]
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v))[0]


def f64(x: float) -> str:
    """An LLVM double literal."""
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def splat(ty: str, n: int, value: str) -> str:
    return f"<{', '.join([f'{ty} {value}'] * n)}>"


class Fn:
    def __init__(self, name: str, params: list[tuple[str, str]], ret: str = "void",
                 linkage: str = "internal", attrs: str = ""):
        self.name, self.params, self.ret, self.linkage, self.attrs = name, params, ret, linkage, attrs
        self.allocas: list[str] = []
        self.body: list[str] = []
        self.n = 0
        self.terminated = False

    # -- names and emission
    def tmp(self, prefix: str = "t") -> str:
        self.n += 1
        return f"%{prefix}{self.n}"

    def __call__(self, line: str) -> None:
        self.body.append("  " + line)

    def op(self, expr: str, prefix: str = "t") -> str:
        name = self.tmp(prefix)
        self(f"{name} = {expr}")
        return name

    # integer arithmetic without nested format strings: f.add(f.mul(i, 4), 1), f.shl(x, 4, I32)
    def _bin(self, op: str, a, b, ty: str) -> str:
        return self.op(f"{op} {ty} {a}, {b}")

    def add(self, a, b, ty="i64"): return self._bin("add", a, b, ty)
    def sub(self, a, b, ty="i64"): return self._bin("sub", a, b, ty)
    def mul(self, a, b, ty="i64"): return self._bin("mul", a, b, ty)
    def udiv(self, a, b, ty="i64"): return self._bin("udiv", a, b, ty)
    def urem(self, a, b, ty="i64"): return self._bin("urem", a, b, ty)
    def and_(self, a, b, ty="i64"): return self._bin("and", a, b, ty)
    def or_(self, a, b, ty="i64"): return self._bin("or", a, b, ty)
    def shl(self, a, b, ty="i64"): return self._bin("shl", a, b, ty)
    def lshr(self, a, b, ty="i64"): return self._bin("lshr", a, b, ty)

    def label(self, prefix: str = "L") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def block(self, label: str) -> None:
        self.body.append(f"{label}:")

    def br(self, label: str) -> None:
        self(f"br label %{label}")

    # -- variables and control flow
    def var(self, ty: str, init: str | None = None, prefix: str = "v") -> "Var":
        name = self.tmp(prefix)
        self.allocas.append(f"  {name} = alloca {ty}, align 32")
        v = Var(self, name, ty)
        if init is not None:
            v.set(init)
        return v

    @contextlib.contextmanager
    def loop(self, start, stop, step=1, ty: str = "i64"):
        """for (i = start; i < stop; i += step): yields i (signed compare)."""
        i = self.var(ty, str(start), prefix="i")
        head, body, done = self.label("head"), self.label("body"), self.label("done")
        self.br(head)
        self.block(head)
        iv = i.get()
        c = self.op(f"icmp slt {ty} {iv}, {stop}")
        self(f"br i1 {c}, label %{body}, label %{done}")
        self.block(body)
        yield iv
        nxt = self.op(f"add {ty} {iv}, {step}")
        i.set(nxt)
        self.br(head)
        self.block(done)

    @contextlib.contextmanager
    def if_(self, cond: str):
        then, done = self.label("then"), self.label("endif")
        self(f"br i1 {cond}, label %{then}, label %{done}")
        self.block(then)
        yield
        self.br(done)
        self.block(done)

    # -- common operations
    def gep(self, ty: str, base: str, index, inbounds: bool = True) -> str:
        return self.op(f"getelementptr {'inbounds ' if inbounds else ''}{ty}, ptr {base}, i64 {index}", "p")

    def load(self, ty: str, ptr: str, align: int = 1) -> str:
        return self.op(f"load {ty}, ptr {ptr}, align {align}")

    def store(self, ty: str, value: str, ptr: str, align: int = 1) -> None:
        self(f"store {ty} {value}, ptr {ptr}, align {align}")

    def call(self, ret: str, fn: str, *args: str) -> str | None:
        if ret == "void":
            self(f"call void {fn}({', '.join(args)})")
            return None
        return self.op(f"call {ret} {fn}({', '.join(args)})")

    def text(self) -> str:
        params = ", ".join(f"{t} {n}" for t, n in self.params)
        lines = [f"define {self.linkage} {self.ret} @{self.name}({params}) {self.attrs} {{", "entry:"]
        lines += self.allocas
        lines += self.body
        if self.ret == "void":
            lines.append("  ret void")
        lines.append("}")
        return "\n".join(lines)


class Var:
    def __init__(self, fn: Fn, ptr: str, ty: str):
        self.fn, self.ptr, self.ty = fn, ptr, ty

    def get(self) -> str:
        return self.fn.load(self.ty, self.ptr, 32 if self.ty.startswith("<") else 1)

    def set(self, value: str) -> None:
        self.fn.store(self.ty, value, self.ptr, 32 if self.ty.startswith("<") else 1)
