"""Reading compiled GPU code without a GPU: disassembly, instruction mix, loops, resources.

The tools are the ``cuobjdump`` and ``nvdisasm`` shipped in the triton wheel
(``triton/backends/nvidia/bin/``; the CUDA toolkit of these machines has no cuobjdump),
or the ones on PATH.

* :func:`cubins` pulls the per-architecture cubins out of a cubin, an object file or a
  shared library (``cuobjdump -xelf``).
* :func:`analyze_cubin` disassembles a cubin with line info and the inlining chains
  (``nvdisasm -gi -c``; ``-g`` where it lacks ``-gi``) and reads ``cuobjdump -res-usage``; for every function it returns a :class:`Code`:
  registers, stack, static shared memory, the count of every opcode, global / shared /
  local accesses split by width, the loops, and the two regions the cost model needs:
  the *main loop* (the innermost loop with the tensor-core instructions, or with the
  FMAs when there are none) and the *tile loop* around it.

Spills: the bytes of the local-memory stores and loads (STL / LDL, by width) in the code,
what ``ptxas -v`` reports as spill stores / loads when the function has no local arrays.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

TENSOR_OPS = ("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA")
FMA_OPS = ("FFMA", "DFMA", "HFMA2")


def tool(name: str) -> str:
    """Path of cuobjdump / nvdisasm: the triton wheel's, else PATH's."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            name)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install triton (its wheel ships it) or "
                                "put the CUDA toolkit's bin/ on PATH")
    return found


def _run(args: List[str]) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): "
                           f"{out.stderr.strip()[:2000]}")
    return out.stdout


def cubins(path: str) -> Dict[str, bytes]:
    """{arch: cubin bytes} of every SASS image in ``path`` (a cubin, an object file or a
    shared library with an embedded fatbin)."""
    if path.endswith(".cubin"):
        with open(path, "rb") as f:
            data = f.read()
        return {_arch_of(data): data}
    listing = _run([tool("cuobjdump"), "-lelf", path])
    names = re.findall(r"ELF file\s+\d+:\s+(\S+)", listing)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(path)], cwd=tmp,
                       capture_output=True, check=True, timeout=600)
        for name in names:
            m = re.search(r"\.(sm_\d+[a-z]?)\.cubin$", name)
            fpath = os.path.join(tmp, name)
            if m and os.path.exists(fpath):
                with open(fpath, "rb") as f:
                    out[m.group(1)] = f.read()
    return out


def _arch_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        m = re.search(r"\.target\s+(sm_\d+[a-z]?)", _run([tool("cuobjdump"), "-sass", f.name]))
    return m.group(1) if m else "unknown"


@dataclasses.dataclass
class Instr:
    pc: int
    op: str            # full opcode with modifiers, e.g. LDG.E.128
    text: str          # the instruction without its predicate
    line: Optional[Tuple[str, int]] = None    # its source line (the innermost)
    # the call sites it was inlined through, innermost first (``nvdisasm -gi``)
    sites: Tuple[Tuple[str, int], ...] = ()
    pred: str = ""     # its guard predicate (e.g. "@P0", "@!PT"), "" when unconditional
    # the subroutine it belongs to, code reached by CALL and placed after the function's
    # own: the CUDA library's (``$__internal_3_$__cuda_sm20_div_s64``: the slow paths of
    # IEEE division / reciprocal / square root and of 64-bit integer division) or a
    # __noinline__ device function; "" in the function's own code
    subroutine: str = ""

    @property
    def lines(self) -> Tuple[Tuple[str, int], ...]:
        """Its source line and the call sites it was inlined at."""
        return ((self.line,) if self.line else ()) + self.sites

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclasses.dataclass
class Loop:
    head: int
    tail: int          # pc of the (last) back edge
    size: int = 0      # static instructions in [head, tail]
    line: Optional[Tuple[str, int]] = None
    depth: int = 0


@dataclasses.dataclass
class Region:
    """A set of instructions and their counts (static: each counted once)."""
    size: int
    counts: Dict[str, int]
    mma_flops_per_warp: float   # tensor-core FLOPs one warp's pass issues
    fma_flops_per_warp: float   # FP32/FP64 FMA FLOPs one warp's pass issues
    ex2: int                    # MUFU.EX2 (exp) instructions

    def to_json(self) -> dict:
        return dict(size=self.size, mma_flops_per_warp=self.mma_flops_per_warp,
                    fma_flops_per_warp=self.fma_flops_per_warp, ex2=self.ex2,
                    counts=dict(sorted(self.counts.items())))


@dataclasses.dataclass
class Code:
    """What the machine code of one function says."""
    name: str
    arch: str
    regs: int
    stack: int
    static_smem: int
    local: int
    size: int
    counts: Dict[str, int]          # opcode (with modifiers) -> static count
    access: Dict[str, int]          # global/shared/local loads and stores by width
    spill_store_bytes: int
    spill_load_bytes: int
    loops: List[Loop]
    main: Optional[Region]          # one main-loop iteration
    epilogue: Optional[Region]      # the tile loop's body outside the main loop
    rest: Region                    # everything outside the tile loop (or the main loop)
    main_loop: Optional[Loop] = None
    tile_loop: Optional[Loop] = None
    instrs: List[Instr] = dataclasses.field(default_factory=list, repr=False)

    def base_counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for op, n in self.counts.items():
            out[op.split(".")[0]] = out.get(op.split(".")[0], 0) + n
        return out


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_FUNC = re.compile(r"^\.text\.(\S+):\s*$", re.M)
_SUBROUTINE = re.compile(r"^(\$[\w$.]+):$")


def parse_listing(text: str) -> Dict[str, List[Instr]]:
    """Functions of an ``nvdisasm -g[i] -c`` (or ``cuobjdump -sass``) listing, in order.

    A run of ``//## File "A", line a inlined at "B", line b`` comments before an
    instruction is its inlining chain, innermost first (``-gi``): the instruction's line
    is the first run's (A, a), its sites every "inlined at" (B, b) of the run."""
    funcs: Dict[str, List[Instr]] = {}
    cur: Optional[List[Instr]] = None
    line = None
    sites: List[Tuple[str, int]] = []
    in_run = False
    sub = ""
    for raw in text.splitlines():
        s = raw.strip()
        m = re.match(r"^\.text\.(\S+):$", s) or re.match(r"^Function : (\S+)$", s)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            line, sites, in_run, sub = None, [], False, ""
            continue
        m = _SUBROUTINE.match(s)
        if m:  # the subroutines follow the function's own code, to its end
            sub = m.group(1)
            continue
        m = _LINE.search(s)
        if m:
            if not in_run:   # a new chain: its first comment is the innermost line
                line, sites, in_run = (m.group(1), int(m.group(2))), [], True
            if m.group(3):
                sites.append((m.group(3), int(m.group(4))))
            continue
        if cur is None:
            continue
        m = _INSTR.search(s)
        if not m:
            continue
        text_i = m.group(2).strip()
        toks = text_i.split()
        pred = ""
        if toks and toks[0].startswith("@"):
            pred, toks = toks[0], toks[1:]
        if not toks:
            continue
        in_run = False
        cur.append(Instr(int(m.group(1), 16), toks[0], " ".join(toks), line, tuple(sites),
                         pred, sub))
    return funcs


def access_width(op: str) -> int:
    """Bytes per thread of a load / store opcode (LDG.E.128 -> 16, LDG.E.U16 -> 2)."""
    mods = op.split(".")[1:]
    for m in mods:
        if m in ("128", "64", "32"):
            return int(m) // 8
        if m in ("U8", "S8"):
            return 1
        if m in ("U16", "S16"):
            return 2
    return 4


def _access_counts(instrs: List[Instr]) -> Dict[str, int]:
    """Global loads / stores split into 128-bit and narrower, plus shared / local ones."""
    out = {"ldg_128": 0, "ldg_narrow": 0, "stg_128": 0, "stg_narrow": 0,
           "ldgsts_128": 0, "ldgsts_narrow": 0, "tma_load": 0, "tma_store": 0,
           "lds": 0, "sts": 0, "ldsm": 0, "ldl": 0, "stl": 0, "atomic_global": 0}
    for ins in instrs:
        b = ins.base
        if b in ("LDG", "STG", "LDGSTS"):
            key = {"LDG": "ldg", "STG": "stg", "LDGSTS": "ldgsts"}[b]
            out[f"{key}_{'128' if access_width(ins.op) == 16 else 'narrow'}"] += 1
        elif b == "UTMALDG":
            out["tma_load"] += 1
        elif b in ("UTMASTG", "UTMAREDG"):
            out["tma_store"] += 1
        elif b == "LDS":
            out["lds"] += 1
        elif b == "STS":
            out["sts"] += 1
        elif b == "LDSM":
            out["ldsm"] += 1
        elif b == "LDL":
            out["ldl"] += 1
        elif b == "STL":
            out["stl"] += 1
        elif b in ("RED", "REDG", "ATOMG", "ATOM"):
            out["atomic_global"] += 1
    return out


def mma_flops_per_warp(op: str) -> float:
    """Tensor-core FLOPs of one warp's issue of ``op`` (0 for other opcodes).

    HGMMA.MxNxK runs on a warpgroup (4 warps issue it together): 2 M N K / 4 per warp.
    HMMA.16816 / HMMA.1688 (mma.sync m16n8k16 / m16n8k8): 2 M N K per warp."""
    m = re.match(r"[A-Z]GMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        mm, nn, kk = (int(v) for v in m.groups())
        return 2.0 * mm * nn * kk / 4
    m = re.match(r"[HID]MMA\.(\d+)", op)
    if m:
        shape = m.group(1)
        if shape.startswith("16"):      # 16 8 K
            return 2.0 * 16 * 8 * int(shape[3:])
        if len(shape) == 3:             # Volta-style 8 8 4
            return 2.0 * int(shape[0]) * int(shape[1]) * int(shape[2])
    return 0.0


def fma_flops_per_warp(op: str) -> float:
    b = op.split(".")[0]
    if b in ("FFMA", "DFMA"):
        return 64.0
    if b == "HFMA2":
        return 128.0
    return 0.0


def region(instrs: List[Instr]) -> Region:
    counts: Dict[str, int] = {}
    mma = fma = 0.0
    ex2 = 0
    for ins in instrs:
        counts[ins.op] = counts.get(ins.op, 0) + 1
        mma += mma_flops_per_warp(ins.op)
        fma += fma_flops_per_warp(ins.op)
        if ins.op.startswith("MUFU.EX2"):
            ex2 += 1
    return Region(len(instrs), counts, mma, fma, ex2)


def _target(ins: Instr) -> Optional[int]:
    """The address a branch jumps to (None: not a direct branch)."""
    if ins.base not in ("BRA", "JMP"):
        return None
    m = re.search(r"0x([0-9a-f]+)", ins.text)
    return int(m.group(1), 16) if m else None


def _merge_out_of_line(instrs: List[Instr], loops: List[Loop]) -> List[Loop]:
    """Blocks of a loop body that the compiler placed before the loop's head: a branch
    in loop L jumps back to a block B = [b, L.head) which returns into L, so that the
    "loop" (b, that branch) overlaps L without nesting. When nothing else enters B (the
    instruction before it does not fall through, and no branch from outside B and L
    targets it), B is part of L's body: L starts at b, and the false loop goes."""
    by_pc = {i.pc: k for k, i in enumerate(instrs)}
    changed = True
    while changed:
        changed = False
        for outer in loops:
            for blk in loops:
                if not (blk.head < outer.head <= blk.tail < outer.tail):
                    continue
                k = by_pc.get(blk.head)
                if k is None:
                    continue
                prev = instrs[k - 1] if k > 0 else None
                falls = prev is None or not (
                    prev.base in ("EXIT", "RET") or
                    (prev.base in ("BRA", "JMP") and prev.pred in ("", "@PT")))
                entered = any(
                    t is not None and blk.head <= t < outer.head and
                    not (blk.head <= i.pc <= outer.tail)
                    for i in instrs for t in (_target(i),))
                if falls or entered:
                    continue
                outer.head = blk.head
                loops.remove(blk)
                changed = True
                break
            if changed:
                break
    return loops


def find_loops(instrs: List[Instr]) -> List[Loop]:
    """Natural loops from the backward branches (BRA to an earlier or the same pc), one
    per loop head, with their nesting depth; a block of a loop's body placed before its
    head (out of line) is made part of it (:func:`_merge_out_of_line`)."""
    heads: Dict[int, Loop] = {}
    # code placed out of line after the last EXIT (slow paths) jumps back into the body:
    # such branches are returns, not loops
    exits = [i.pc for i in instrs if i.base == "EXIT"]
    last_exit = max(exits) if exits else None
    for ins in instrs:
        if ins.base not in ("BRA", "JMP"):
            continue
        if last_exit is not None and ins.pc > last_exit:
            continue
        m = re.search(r"0x([0-9a-f]+)|\.L_x_\d+", ins.text)
        if not m or m.group(1) is None:
            continue
        tgt = int(m.group(1), 16)
        if tgt <= ins.pc:
            lp = heads.get(tgt)
            if lp is None or ins.pc > lp.tail:
                heads[tgt] = Loop(tgt, ins.pc, line=ins.line)
    loops = _merge_out_of_line(instrs, sorted(heads.values(),
                                              key=lambda lp: (lp.head, -lp.tail)))
    loops = sorted(loops, key=lambda lp: (lp.head, -lp.tail))
    for lp in loops:
        lp.size = sum(1 for i in instrs if lp.head <= i.pc <= lp.tail)
        lp.depth = sum(1 for o in loops if o is not lp and o.head <= lp.head
                       and lp.tail <= o.tail)
    return loops


def _inside(ins: Instr, lp: Optional[Loop]) -> bool:
    return lp is not None and lp.head <= ins.pc <= lp.tail


def _resolve_branch_labels(text: str) -> str:
    """nvdisasm writes branch targets as labels (``BRA `(.L_x_12)``) and defines them as
    ``.L_x_12:`` lines; rewrite each use to the label's address so that loops are found
    the same way as in cuobjdump listings."""
    addr: Dict[str, int] = {}
    pending: List[str] = []
    for raw in text.splitlines():
        s = raw.strip()
        m = re.match(r"^(\.L_x_\d+):$", s)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(s)
        if m and pending:
            for lab in pending:
                addr[lab] = int(m.group(1), 16)
            pending = []
    return re.sub(r"`\((\.L_x_\d+)\)",
                  lambda mm: hex(addr[mm.group(1)]) if mm.group(1) in addr else mm.group(0),
                  text)


def main_and_tile_loops(instrs: List[Instr], loops: List[Loop]
                        ) -> Tuple[Optional[Loop], Optional[Loop]]:
    """(main loop, tile loop). The main loop is the loop whose own body holds the most
    tensor-core FLOPs (FMA FLOPs when no loop has tensor-core instructions), innermost on
    ties; the tile loop is the outermost loop enclosing it (loops between the two, e.g.
    a k-loop around an FMA loop, are weighted by their trips inside the tile)."""
    if not loops:
        return None, None

    def score(lp: Loop):
        body = [i for i in instrs if _inside(i, lp)]
        inner = [o for o in loops if o is not lp and lp.head <= o.head and o.tail <= lp.tail]
        own = [i for i in body if not any(_inside(i, o) for o in inner)]
        return (sum(mma_flops_per_warp(i.op) for i in own),
                sum(fma_flops_per_warp(i.op) for i in own), lp.depth)

    scored = [(score(lp), lp) for lp in loops]
    best_score, best = max(scored, key=lambda t: t[0])
    if best_score[0] == 0 and best_score[1] == 0:
        return None, None
    around = [o for o in loops if o is not best and o.head <= best.head
              and best.tail <= o.tail]
    tile = min(around, key=lambda o: o.depth) if around else None
    return best, tile


def analyze_instrs(name: str, arch: str, instrs: List[Instr], res: Dict[str, int]) -> Code:
    loops = find_loops(instrs)
    main, tile = main_and_tile_loops(instrs, loops)
    if main is None:
        main_r = epi_r = None
        rest = region(instrs)
    else:
        main_r = region([i for i in instrs if _inside(i, main)])
        outer = tile
        epi_r = region([i for i in instrs if _inside(i, outer) and not _inside(i, main)]) \
            if outer is not None else region([i for i in instrs if not _inside(i, main)])
        rest = region([i for i in instrs if not _inside(i, outer)]) if outer is not None \
            else region([])
    counts: Dict[str, int] = {}
    st = ld = 0
    for ins in instrs:
        counts[ins.op] = counts.get(ins.op, 0) + 1
        if ins.base == "STL":
            st += access_width(ins.op)
        elif ins.base == "LDL":
            ld += access_width(ins.op)
    return Code(name=name, arch=arch, regs=res.get("REG", 0), stack=res.get("STACK", 0),
                static_smem=res.get("SHARED", 0), local=res.get("LOCAL", 0),
                size=len(instrs), counts=counts, access=_access_counts(instrs),
                spill_store_bytes=st, spill_load_bytes=ld, loops=loops, main=main_r,
                epilogue=epi_r, rest=rest, main_loop=main, tile_loop=tile, instrs=instrs)


def resource_usage(cubin_path: str) -> Dict[str, Dict[str, int]]:
    """{function: {REG, STACK, SHARED, LOCAL, ...}} from ``cuobjdump -res-usage``."""
    text = _run([tool("cuobjdump"), "-res-usage", cubin_path])
    out: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is not None and "REG:" in line:
            for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line):
                cur[k] = int(v)
            cur = None
    return out


@functools.lru_cache(maxsize=None)
def _analyze_cached(cubin: bytes, arch: str) -> Dict[str, Code]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = resource_usage(path)
        listing = None
        # line info with the inlining chains, else line info, else a plain listing
        for flags in (["-gi"], ["-g"], []):
            try:
                listing = _run([tool("nvdisasm"), *flags, "-c", path])
                break
            except RuntimeError:
                continue
        if listing is None:
            raise RuntimeError(f"nvdisasm cannot disassemble {path}")
    funcs = parse_listing(_resolve_branch_labels(listing))
    return {name: analyze_instrs(name, arch, instrs, res.get(name, {}))
            for name, instrs in funcs.items() if instrs}


def analyze_cubin(cubin: bytes, arch: str) -> Dict[str, Code]:
    """{function name (mangled): Code} of every function in the cubin."""
    return _analyze_cached(bytes(cubin), arch)


def demangle(names: List[str]) -> Dict[str, str]:
    """Demangled C++ names (c++filt), or the names themselves when it is missing."""
    exe = shutil.which("c++filt")
    if exe is None or not names:
        return {n: n for n in names}
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def blocks_per_sm(gpu, regs: int, threads: int, smem: int) -> Tuple[int, str]:
    """Resident blocks per SM by the occupancy rules, and the limiting resource.

    Registers are allocated per warp in units of 256 (regs per thread rounded up to a
    multiple of 8), from four 16K-register partitions; shared memory adds the driver's
    reservation per block; at most 2048 threads and 32 blocks per SM."""
    warps = max(1, -(-threads // 32))
    limits = {"blocks": gpu.max_blocks_per_sm,
              "threads": gpu.max_threads_per_sm // (warps * 32)}
    if regs > 0:
        per_warp = -(-regs * 32 // 256) * 256
        warps_by_regs = 4 * ((gpu.regs_per_sm // 4) // per_warp)
        limits["registers"] = warps_by_regs // warps
    if smem > 0:
        if smem > gpu.smem_per_block:
            return 0, "shared memory"
        limits["shared memory"] = gpu.smem_per_sm // (smem + gpu.smem_reserved_per_block)
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name
