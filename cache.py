"""The paged KV cache: one big tensor of fixed-size blocks, and the bookkeeping of who owns which block.

    kv = allocate_kv_cache(cfg, num_blocks, block_size, dtype, device)   # the tensor the model reads/writes
    blocks = BlockManager(num_blocks, block_size)                         # pure Python, no torch

A sequence's K/V live in blocks of `block_size` tokens listed in its block table. Blocks are reference
counted: a block may be shared by many sequences when they start with the same tokens (prefix caching).

Prefix caching (RadixAttention, as in SGLang) keeps computed blocks after their sequences finish, in a
radix tree keyed by token ids. Each edge of the tree is exactly one full block of tokens, so a node is one
block and a match or an insert never has to split an edge. A new request walks the tree with its prompt and
reuses the blocks it finds; blocks nobody references stay cached until the pool needs room, then the least
recently used leaves are evicted first.

Block states: free (in `free`), in use (ref > 0), cached (in the tree, ref == 0, evictable).
Block 0 is reserved: CUDA-graph padding rows write there, so no sequence ever owns it.
"""
from collections import OrderedDict, deque

import torch


def allocate_kv_cache(cfg, num_blocks: int, block_size: int, dtype, device) -> torch.Tensor:
    """(num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim): layer i's K is kv[i, 0], V is kv[i, 1]."""
    return torch.zeros(cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                       dtype=dtype, device=device)


def kv_bytes_per_block(cfg, block_size: int, dtype) -> int:
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


class Node:
    """One cached block: the block_size token ids it holds (its key under the parent) and its block id."""
    __slots__ = ("key", "block", "parent", "children")

    def __init__(self, key, block, parent):
        self.key, self.block, self.parent = key, block, parent
        self.children: dict[tuple, "Node"] = {}


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.free = deque(range(1, num_blocks))
        self.ref = [0] * num_blocks
        self.root = Node((), -1, None)
        self.node_of: dict[int, Node] = {}            # block id -> its tree node, for cached blocks
        # leaves of the tree whose block nobody references, least recently released first
        self.evictable: "OrderedDict[Node, None]" = OrderedDict()
        self.num_cached_idle = 0                       # tree blocks with ref == 0 (all eventually evictable)
        self.hit_tokens = 0                            # stats: prompt tokens served from the cache

    # ---- capacity -----------------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        """Blocks that can be handed out now: free ones plus cached ones nobody uses."""
        return len(self.free) + self.num_cached_idle

    def stats(self) -> dict:
        return {"blocks_total": self.num_blocks - 1, "blocks_free": len(self.free),
                "blocks_cached": self.num_cached_idle,
                "blocks_in_use": self.num_blocks - 1 - len(self.free) - self.num_cached_idle,
                "prefix_hit_tokens": self.hit_tokens}

    # ---- reference counting -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref 1; evicts cached blocks (LRU) when the free list runs short."""
        if n > self.num_usable:
            raise RuntimeError(f"KV cache out of blocks: need {n}, have {self.num_usable}")
        if n > len(self.free):
            self.evict(n - len(self.free))
        out = [self.free.popleft() for _ in range(n)]
        for b in out:
            self.ref[b] = 1
        return out

    def acquire(self, blocks: list[int]):
        """Take one more reference on blocks already in use or cached (a prefix-cache hit)."""
        for b in blocks:
            if self.ref[b] == 0:
                node = self.node_of[b]
                self.num_cached_idle -= 1
                self.evictable.pop(node, None)
            self.ref[b] += 1

    def release(self, blocks: list[int]):
        """Drop one reference from each block; unreferenced blocks become cached (if in the tree) or free."""
        for b in reversed(blocks):                     # leaf end first, so parents see their children idle
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released more often than taken"
            if self.ref[b] == 0:
                node = self.node_of.get(b)
                if node is None:
                    self.free.append(b)
                else:
                    self.num_cached_idle += 1
                    if not node.children:
                        self.evictable[node] = None

    # ---- the radix tree -----------------------------------------------------------------------------------
    def block_key(self, tokens: list[int], i: int) -> tuple:
        return tuple(tokens[i * self.block_size:(i + 1) * self.block_size])

    def match(self, tokens: list[int]) -> tuple[list[int], Node]:
        """The longest cached run of full blocks that `tokens` starts with: (block ids, deepest node)."""
        node, blocks = self.root, []
        if self.enable_prefix_cache:
            for i in range(len(tokens) // self.block_size):
                child = node.children.get(self.block_key(tokens, i))
                if child is None:
                    break
                node = child
                blocks.append(node.block)
        return blocks, node

    def insert(self, parent: Node, key: tuple, block: int) -> Node | None:
        """Cache `block` (holding the tokens `key`, following `parent`'s tokens) as a child of parent.
        Returns the child node, or None when another block with the same tokens is already there (two
        sequences computed the same prefix at once): the caller keeps its copy private and stops inserting."""
        if not self.enable_prefix_cache:
            return None
        child = parent.children.get(key)
        if child is not None:
            return child if child.block == block else None
        child = Node(key, block, parent)
        parent.children[key] = child
        self.node_of[block] = child
        self.evictable.pop(parent, None)               # a parent with a child is no longer a leaf
        return child

    def evict(self, n: int):
        """Return n cached, unreferenced blocks to the free list, least recently used leaves first."""
        for _ in range(n):
            node, _ = self.evictable.popitem(last=False)
            del node.parent.children[node.key]
            del self.node_of[node.block]
            self.free.append(node.block)
            self.num_cached_idle -= 1
            parent = node.parent
            if parent is not self.root and not parent.children and self.ref[parent.block] == 0:
                self.evictable[parent] = None

    def clear_cache(self):
        """Evict every cached block nobody uses (after this, an idle engine has all blocks free)."""
        self.evict(self.num_cached_idle)
