//! mHC residual-stream projections: Sinkhorn-Knopp (forward and backward), the permutation
//! basis of n streams, and the Birkhoff–von Neumann decomposition.
