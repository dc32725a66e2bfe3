"""llamanp: Llama-family inference in pure NumPy.

    import llamanp
    m = llamanp.load("model.lmw")
    ids = m.tokenizer.encode("Once upon a time", bos=True)
    print(m.tokenizer.decode(list(llamanp.generate(m, ids, 32))))
"""

from .batch import BatchResult, generate_batch
from .beam import Beam, beam_search
from .config import Config, RopeScaling
from .errors import LlamanpError
from .generate import Generation, generate
from .model import Model, Session, load
from .perplexity import PerplexityResult, perplexity
from .sampling import Sampler
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["BatchResult", "Beam", "Config", "Generation", "LlamanpError", "Model",
           "PerplexityResult", "RopeScaling", "Sampler", "Session", "Tokenizer", "__version__",
           "beam_search", "generate", "generate_batch", "load", "load_tokenizer", "perplexity"]
