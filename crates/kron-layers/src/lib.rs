//! Layers (dense, conv, activations, pooling, dropout, Sequential) that carry their Fisher-block metadata.
