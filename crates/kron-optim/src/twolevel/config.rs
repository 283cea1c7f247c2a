//! The coarse correction's settings.

use serde::{Deserialize, Serialize};

use crate::error::OptimError;

/// The coarse space: which vector (or vectors) stand for each layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoarseSpace {
    /// One all-ones vector per layer (Nicolaides' piecewise-constant space; the default).
    Nicolaides,
    /// Per layer the rank-one `q_G q_A^T` of the eigenvectors of the smallest eigenvalues of
    /// the factors `G` and `A`: the direction the one-level preconditioner amplifies most, as
    /// the authors' code takes it. Built at each refresh.
    Spectral,
    /// Per layer the one-level-preconditioned residual `M_i^-1 (v - (F + λ) M^-1 v)_i` of
    /// this step, with exact Fisher-vector products from the captures. Built every step.
    Residual,
    /// All-ones vectors as Nicolaides, but the coarse matrix from Kronecker-style cross-layer
    /// factors `E[a_i a_j^T]`, `E[g_i g_j^T]` instead of the exact Fisher (Tselepidis, Kohler
    /// and Orvieto 2020).
    Tselepidis,
}

/// The two-level correction: its coarse space (or none), Krylov enrichment, and the power
/// iterations the spectral space spends when the factors have no eigenbasis.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoarseConfig {
    /// The coarse space, or `None` for the one-level update alone (then the optimizer gives
    /// the same bits as [`Kfac`](crate::Kfac)).
    pub space: Option<CoarseSpace>,
    /// A second vector per layer, `M_i^-1 r_i` (one Krylov step): with Nicolaides or residual.
    pub krylov: bool,
    /// The most power iterations for each factor's extreme eigenvector (spectral space with the
    /// explicit-inverse method; it stops earlier once the Rayleigh quotient settles).
    pub power_iterations: usize,
}

impl CoarseConfig {
    /// Nicolaides' space, no Krylov enrichment, 50 power iterations.
    pub const DEFAULT: CoarseConfig = CoarseConfig {
        space: Some(CoarseSpace::Nicolaides),
        krylov: false,
        power_iterations: 50,
    };

    /// No coarse correction: the one-level update alone.
    pub const OFF: CoarseConfig = CoarseConfig {
        space: None,
        ..CoarseConfig::DEFAULT
    };

    /// The given space, no Krylov enrichment.
    pub const fn new(space: CoarseSpace) -> Self {
        CoarseConfig {
            space: Some(space),
            ..CoarseConfig::DEFAULT
        }
    }

    /// With (or without) the Krylov enrichment.
    pub const fn with_krylov(mut self, on: bool) -> Self {
        self.krylov = on;
        self
    }

    /// With at most `n` power iterations per eigenvector.
    pub const fn with_power_iterations(mut self, n: usize) -> Self {
        self.power_iterations = n;
        self
    }

    /// The coarse vectors per layer (0 when off).
    pub fn vectors_per_layer(&self) -> usize {
        match self.space {
            None => 0,
            Some(_) if self.krylov => 2,
            Some(_) => 1,
        }
    }

    /// Parses the examples' names: `off`, `nicolaides`, `spectral`, `residual`, `tselepidis`,
    /// `krylov-nicolaides`, `krylov-residual`.
    ///
    /// # Errors
    /// [`OptimError::Config`] (field `coarse`) naming the accepted values.
    pub fn parse(name: &str) -> Result<Self, OptimError> {
        let c = match name {
            "off" | "none" => CoarseConfig::OFF,
            "nicolaides" => CoarseConfig::new(CoarseSpace::Nicolaides),
            "spectral" => CoarseConfig::new(CoarseSpace::Spectral),
            "residual" => CoarseConfig::new(CoarseSpace::Residual),
            "tselepidis" => CoarseConfig::new(CoarseSpace::Tselepidis),
            "krylov-nicolaides" => CoarseConfig::new(CoarseSpace::Nicolaides).with_krylov(true),
            "krylov-residual" => CoarseConfig::new(CoarseSpace::Residual).with_krylov(true),
            _ => {
                return Err(OptimError::Config {
                    field: "coarse".into(),
                    detail: format!(
                        "`{name}` is not a coarse space; one of off, nicolaides, spectral, \
                         residual, tselepidis, krylov-nicolaides, krylov-residual"
                    ),
                });
            }
        };
        Ok(c)
    }

    /// The name [`CoarseConfig::parse`] reads back.
    pub fn name(&self) -> &'static str {
        match (self.space, self.krylov) {
            (None, _) => "off",
            (Some(CoarseSpace::Nicolaides), false) => "nicolaides",
            (Some(CoarseSpace::Nicolaides), true) => "krylov-nicolaides",
            (Some(CoarseSpace::Spectral), _) => "spectral",
            (Some(CoarseSpace::Residual), false) => "residual",
            (Some(CoarseSpace::Residual), true) => "krylov-residual",
            (Some(CoarseSpace::Tselepidis), _) => "tselepidis",
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field: Krylov enrichment with a space other than
    /// Nicolaides or residual, or no power iterations.
    pub fn validate(&self) -> Result<(), OptimError> {
        if self.krylov
            && !matches!(
                self.space,
                Some(CoarseSpace::Nicolaides | CoarseSpace::Residual)
            )
        {
            return Err(OptimError::Config {
                field: "coarse.krylov".into(),
                detail: format!(
                    "Krylov enrichment needs the Nicolaides or the residual space, not {:?}",
                    self.space
                ),
            });
        }
        if self.power_iterations == 0 {
            return Err(OptimError::Config {
                field: "coarse.power_iterations".into(),
                detail: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

impl Default for CoarseConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}
