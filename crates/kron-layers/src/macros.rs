//! [`module!`](crate::module): a struct of modules and its `impl Module` from one definition.

/// Defines a struct whose fields are modules and implements [`Module`](crate::Module) for it
/// with the forward pass you write: `visit_params` and `visit_blocks` visit every field, in
/// declaration order, so no layer can be left out of the Fisher blocks (a layer missing from
/// `visit_blocks` would be trained by the optimizer's first-order fallback instead of its
/// curvature).
///
/// Attributes, doc comments and visibility on the struct and on each field pass through. Every
/// field must be a `Module` (a layer, a [`Sequential`](crate::Sequential), an
/// [`Activation`](crate::Activation), another `module!` struct, a `Box<dyn Module>`); a struct
/// that holds other data, or generic parameters, implements `Module` by hand as the trait's
/// docs say.
///
/// ```
/// use kron_autodiff::{ParamStore, Rng, Tape, Tensor, Var};
/// use kron_layers::{Dense, Module};
///
/// kron_layers::module! {
///     /// `x + second(relu(first(x)))`.
///     pub struct Residual {
///         /// Widens.
///         pub first: Dense,
///         /// Narrows back to the input's width.
///         pub second: Dense,
///     }
///
///     fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
///         x + self.second.forward(self.first.forward(x).relu())
///     }
/// }
///
/// let mut store = ParamStore::new();
/// let mut rng = Rng::new(0);
/// let model = Residual {
///     first: Dense::new(&mut store, "first", 4, 8, &mut rng),
///     second: Dense::new(&mut store, "second", 8, 4, &mut rng),
/// };
/// assert_eq!(model.fisher_blocks().len(), 2);
/// assert_eq!(model.param_ids().len(), 4);
/// let tape = Tape::new(&store);
/// let y = model.forward(tape.input(Tensor::zeros(&[3, 4])));
/// assert_eq!(y.value().shape(), &[3, 4]);
/// ```
#[macro_export]
macro_rules! module {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident : $field_ty:ty
            ),* $(,)?
        }

        $(#[$fn_meta:meta])*
        fn forward<$t:lifetime>(&$self:ident, $x:ident : $x_ty:ty) -> $out_ty:ty $body:block
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $(
                $(#[$field_meta])*
                $field_vis $field: $field_ty,
            )*
        }

        impl $crate::Module for $name {
            $(#[$fn_meta])*
            fn forward<$t>(&$self, $x: $x_ty) -> $out_ty $body

            fn visit_params(&self, f: &mut dyn FnMut($crate::__macro::ParamId)) {
                $( $crate::Module::visit_params(&self.$field, f); )*
            }

            fn visit_blocks(&self, f: &mut dyn FnMut(&$crate::FisherBlock)) {
                $( $crate::Module::visit_blocks(&self.$field, f); )*
            }
        }
    };
}
