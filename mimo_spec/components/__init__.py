"""Model components: plain nn.Modules with explicit constructor arguments."""
