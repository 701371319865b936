def save_adapters(*a, **k): raise NotImplementedError
def load_adapters(*a, **k): raise NotImplementedError
def fingerprint(*a, **k): raise NotImplementedError
class AdapterCheckpointManager: pass
