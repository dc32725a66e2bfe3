"""llamanp: Llama-family inference in pure NumPy.

    import llamanp
    m = llamanp.load("model.lmw")
    ids = m.tokenizer.encode("Once upon a time", bos=True)
    print(m.tokenizer.decode(list(llamanp.generate(m, ids, 32))))
"""

from .beam import Beam, beam_search
from .config import Config, RopeScaling
from .errors import LlamanpError
from .generate import Generation, generate
from .model import Model, Session, load
from .sampling import Sampler
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["Beam", "beam_search", "Config", "RopeScaling", "LlamanpError", "Generation",
           "generate", "Model", "Session", "load", "Sampler", "Tokenizer", "load_tokenizer",
           "__version__"]
