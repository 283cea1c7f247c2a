//! Parameters live in a [`ParamStore`] beside the model; layers hold [`ParamId`]s into it.

use serde::{Deserialize, Serialize};

use crate::tensor::Tensor;

/// A stable handle to one parameter tensor of a [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParamId(pub u32);

impl ParamId {
    /// The position of the parameter in its store.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A stable handle to one layer that carries a Fisher block (its capture site on the tape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerId(pub u32);

/// The parameters of a model, by id, each with a dotted name (`encoder.0.weight`).
///
/// Names follow PyTorch's `state_dict` convention so that safetensors files interchange.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ParamStoreRepr")]
pub struct ParamStore {
    values: Vec<Tensor>,
    names: Vec<String>,
    layers: Vec<String>,
}

/// A store as serde reads it, before its names are checked against its values.
#[derive(Deserialize)]
struct ParamStoreRepr {
    values: Vec<Tensor>,
    names: Vec<String>,
    layers: Vec<String>,
}

impl TryFrom<ParamStoreRepr> for ParamStore {
    type Error = String;

    /// Refuses a store whose names do not match its values one for one, or that names two
    /// parameters alike (what [`ParamStore::add`] would refuse).
    fn try_from(r: ParamStoreRepr) -> Result<Self, String> {
        if r.values.len() != r.names.len() {
            return Err(format!(
                "parameter store with {} values but {} names",
                r.values.len(),
                r.names.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = r.names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(format!("parameter store names {dup:?} twice"));
        }
        Ok(ParamStore {
            values: r.values,
            names: r.names,
            layers: r.layers,
        })
    }
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter and returns its id.
    ///
    /// # Panics
    /// If a parameter of that name already exists.
    #[track_caller]
    pub fn add(&mut self, name: impl Into<String>, value: Tensor) -> ParamId {
        let name = name.into();
        assert!(
            !self.names.contains(&name),
            "ParamStore::add: a parameter named {name:?} already exists"
        );
        self.values.push(value);
        self.names.push(name);
        ParamId((self.values.len() - 1) as u32)
    }

    /// Registers a layer (a capture site) by its dotted path and returns its id.
    pub fn add_layer(&mut self, path: impl Into<String>) -> LayerId {
        self.layers.push(path.into());
        LayerId((self.layers.len() - 1) as u32)
    }

    /// The dotted path of a layer.
    #[track_caller]
    pub fn layer_path(&self, id: LayerId) -> &str {
        &self.layers[id.0 as usize]
    }

    /// The number of layers registered.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The value of a parameter.
    #[track_caller]
    pub fn get(&self, id: ParamId) -> &Tensor {
        self.values.get(id.index()).unwrap_or_else(|| {
            panic!(
                "ParamStore::get: {id:?} out of range ({} parameters)",
                self.values.len()
            )
        })
    }

    /// Mutable access to a parameter's value.
    #[track_caller]
    pub fn get_mut(&mut self, id: ParamId) -> &mut Tensor {
        let n = self.values.len();
        self.values
            .get_mut(id.index())
            .unwrap_or_else(|| panic!("ParamStore::get_mut: {id:?} out of range ({n} parameters)"))
    }

    /// Replaces a parameter's value with one of the same shape.
    ///
    /// # Panics
    /// If the shapes differ.
    #[track_caller]
    pub fn set(&mut self, id: ParamId, value: Tensor) {
        let old = self.get(id);
        assert_eq!(
            old.shape(),
            value.shape(),
            "ParamStore::set: {} has shape {:?}, new value {:?}",
            self.names[id.index()],
            old.shape(),
            value.shape()
        );
        self.values[id.index()] = value;
    }

    /// The dotted name of a parameter.
    #[track_caller]
    pub fn name(&self, id: ParamId) -> &str {
        &self.names[id.index()]
    }

    /// The id of the parameter with this name.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| ParamId(i as u32))
    }

    /// The number of parameter tensors.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the store holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The number of scalar parameters in all tensors.
    pub fn num_scalars(&self) -> usize {
        self.values.iter().map(Tensor::numel).sum()
    }

    /// All ids, in the order they were added.
    pub fn ids(&self) -> impl Iterator<Item = ParamId> + '_ {
        (0..self.values.len()).map(|i| ParamId(i as u32))
    }

    /// `(id, name, value)` for every parameter, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &str, &Tensor)> + '_ {
        self.values
            .iter()
            .zip(&self.names)
            .enumerate()
            .map(|(i, (v, n))| (ParamId(i as u32), n.as_str(), v))
    }
}
