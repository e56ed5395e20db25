"""GGUF models on llama.cpp: streamed generation, decoder embeddings, yes/no relevance scoring.

Built on llama-cpp-python's low-level bindings (llama.h mirrored in ctypes), not on its `Llama`
class, for three reasons measured on this project's machines (SmolLM2-135M, 2 cores):

- `Llama` always loads weights with llama.cpp's extra buffer types (AMX / repacked layouts). These
  CPUs advertise AMX but the VM does not run it: the first decode dies with SIGILL. The repacked
  copy is also anonymous memory (~95 MB here) on top of the mmapped file. `Llama` cannot turn it off.
- One model serves two contexts, one for generation and reranking and one for embeddings, and
  they share the weights; two `Llama` objects would load the file twice.
- The generation context caps its outputs per batch (`n_outputs_max`): its compute buffer is
  ~18 MB instead of ~100 MB spent on logits for every token of a 512-token prompt batch.

Generation streams share the generation context as separate sequences, decoded together
(`streams.py`); reranking and health checks use one more sequence of it.

Everything llama.cpp hands back is untyped; it stays inside this package:

- `backend.GgufBackend`: the Backend contract: loading, embeddings, and the entry points of
  generation and relevance;
- `context.py`: one llama.cpp context, and the parameters of each kind;
- `loading.py`: the file, its metadata, `options` (`GgufOptions`), the projection head;
- `relevance.py`: the judging prompt, its yes/no score, and the judge (`RelevanceJudge`);
- `streams.py`: generation streams decoded together (continuous batching);
- `threadpool.py`: the generation context's persistent ggml thread pool;
- `vocab.py`: the tokenizer (tokens, pieces, offsets) and the chat template.
"""

from wafer.backends.gguf.backend import GgufBackend
from wafer.backends.gguf.loading import PROJECTION_HEAD, Attention, GgufOptions

__all__ = ["PROJECTION_HEAD", "Attention", "GgufBackend", "GgufOptions"]
