"""Retrieval-augmented generation: index documents (BM25, dense vectors, or both), search them, and answer a
question from the passages found, citing them.

    from gptlab.rag import Index, ask
    index = Index.build(["docs/"], "out/index", dense="out/encoder")   # or Index.load("out/index")
    index.search("how do I resume a run?", k=4, mode="hybrid")          # [Hit(passage, score, source, ...)]
    ask(index, gptlab.load("out/chat-model"), "How do I resume a run?") # Answer(text, sources, ...)
"""

from gptlab.rag.answer import DEFAULT_TEMPLATE, Answer, ask, citations, read_template
from gptlab.rag.index import MODES, Hit, Index

__all__ = ["DEFAULT_TEMPLATE", "MODES", "Answer", "Hit", "Index", "ask", "citations", "read_template"]
