//! Safetensors files: exact round trips, and errors that say what is wrong and leave the store
//! as it was.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use kron_autodiff::io::{
    TensorFileError, load_params, load_params_from, read_tensors, save_params, write_tensors,
};
use kron_autodiff::{ParamStore, Tensor};

/// A unique path under the system's temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "kron-autodiff-test-{}-{tag}-{n}.safetensors",
            std::process::id()
        );
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&path);
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A store with dense and conv parameters of several ranks, including a scalar.
fn model() -> ParamStore {
    let mut s = ParamStore::new();
    s.add("encoder.0.weight", randn(&[4, 3], 1));
    s.add("encoder.0.bias", randn(&[4], 2));
    s.add("conv.weight", randn(&[2, 3, 3, 3], 3));
    s.add("conv.bias", randn(&[2], 4));
    s.add("temperature", Tensor::scalar(0.7));
    s
}

/// The same names and shapes, every value zero.
fn zeroed(store: &ParamStore) -> ParamStore {
    let mut s = ParamStore::new();
    for (_, name, t) in store.iter() {
        s.add(name, Tensor::zeros(t.shape()));
    }
    s
}

fn assert_store_bits_eq(a: &ParamStore, b: &ParamStore) {
    assert_eq!(a.len(), b.len());
    for ((_, na, ta), (_, nb, tb)) in a.iter().zip(b.iter()) {
        assert_eq!(na, nb);
        assert_bits_eq(na, ta, tb);
    }
}

#[test]
fn params_round_trip_bit_for_bit() {
    let mut store = model();
    // Values that a lossy or text path would change: signed zero, subnormals, extremes, NaN
    // with a payload, infinities.
    let special = vec![
        -0.0,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::from_bits(0x7fc0_1234),
        f32::NEG_INFINITY,
        1.0 / 3.0,
        -1e-30,
        f32::INFINITY,
        0.0,
        -f32::MAX,
        1e30,
    ];
    let w = store.find("encoder.0.weight").unwrap();
    store.set(w, Tensor::from_vec(special, &[4, 3]));

    let file = TempFile::new("roundtrip");
    save_params(&store, &file.0).unwrap();
    let mut loaded = zeroed(&store);
    load_params(&mut loaded, &file.0).unwrap();
    assert_store_bits_eq(&loaded, &store);

    // The file holds exactly the store's names, shapes and a format tag.
    let f = read_tensors(&file.0).unwrap();
    let names: Vec<&str> = f.tensors.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = store.iter().map(|(_, n, _)| n).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(f.tensors["temperature"].shape(), &[] as &[usize]);
    assert_eq!(f.meta("format").unwrap(), "kron-params");
    assert_eq!(f.path, file.0);

    // No temporary file is left beside the target.
    let dir = file.0.parent().unwrap();
    let stem = file.0.file_name().unwrap().to_string_lossy().to_string();
    let leftovers: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(&stem) && *n != stem)
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn write_and_read_tensors_with_metadata() {
    let file = TempFile::new("tensors");
    let a = randn(&[2, 5], 10);
    let b = randn(&[3], 11);
    let mut meta = HashMap::new();
    meta.insert("step".to_string(), "17".to_string());
    meta.insert("note".to_string(), "{\"json\": true}".to_string());
    write_tensors(
        &file.0,
        &[("optim/m".to_string(), &a), ("optim/v".to_string(), &b)],
        meta.clone(),
    )
    .unwrap();
    let mut f = read_tensors(&file.0).unwrap();
    assert_eq!(f.metadata, meta);
    assert_eq!(f.meta("step").unwrap(), "17");
    let err = f.meta("absent").unwrap_err();
    assert!(matches!(err, TensorFileError::Metadata { .. }), "{err:?}");
    assert!(err.to_string().contains("absent"), "{err}");
    assert_bits_eq("optim/m", f.get("optim/m", Some(&[2, 5])).unwrap(), &a);
    let taken = f.take("optim/v", None).unwrap();
    assert_bits_eq("optim/v", &taken, &b);
    assert!(!f.tensors.contains_key("optim/v"));

    // Overwriting replaces the file.
    write_tensors(&file.0, &[("x".to_string(), &b)], HashMap::new()).unwrap();
    let f = read_tensors(&file.0).unwrap();
    assert_eq!(f.tensors.keys().collect::<Vec<_>>(), ["x"]);
    assert!(f.metadata.is_empty());

    // Loading with a prefix, as a checkpoint stores the model under `model/`.
    let store = model();
    let prefixed: Vec<(String, &Tensor)> = store
        .iter()
        .map(|(_, n, t)| (format!("model/{n}"), t))
        .collect();
    write_tensors(&file.0, &prefixed, HashMap::new()).unwrap();
    let f = read_tensors(&file.0).unwrap();
    let mut loaded = zeroed(&store);
    load_params_from(&mut loaded, &f, "model/").unwrap();
    assert_store_bits_eq(&loaded, &store);
    let mut unprefixed = zeroed(&store);
    let before = unprefixed.clone();
    let err = load_params_from(&mut unprefixed, &f, "").unwrap_err();
    assert!(matches!(err, TensorFileError::Missing { .. }), "{err:?}");
    assert_eq!(unprefixed, before);
}

#[test]
fn extra_tensors_in_the_file_are_ignored() {
    let file = TempFile::new("extra");
    let mut bigger = model();
    bigger.add("head.weight", randn(&[2, 2], 20));
    save_params(&bigger, &file.0).unwrap();
    let store = model();
    let mut loaded = zeroed(&store);
    load_params(&mut loaded, &file.0).unwrap();
    assert_store_bits_eq(&loaded, &store);
}

/// Loads `path` into a zeroed copy of `store` expecting failure; checks that nothing changed
/// and returns the error.
fn load_fails(store: &ParamStore, path: &std::path::Path) -> TensorFileError {
    let mut target = zeroed(store);
    // Give the target distinct values so an accidental partial write would show.
    for id in store.ids() {
        let shape = target.get(id).shape().to_vec();
        target.set(id, Tensor::full(&shape, -7.0));
    }
    let before = target.clone();
    let err = load_params(&mut target, path).expect_err("loading must fail");
    assert_store_bits_eq(&target, &before);
    err
}

#[test]
fn missing_tensor_is_named_and_nothing_is_loaded() {
    let file = TempFile::new("missing");
    let mut partial = ParamStore::new();
    // The first parameters are present and valid: they must not be applied either.
    for (_, name, t) in model().iter() {
        if name != "conv.bias" {
            partial.add(name, t.clone());
        }
    }
    save_params(&partial, &file.0).unwrap();
    let err = load_fails(&model(), &file.0);
    match &err {
        TensorFileError::Missing { name, path } => {
            assert_eq!(name, "conv.bias");
            assert_eq!(path, &file.0);
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("\"conv.bias\"") && msg.contains("missing"),
        "{msg}"
    );
    assert!(msg.contains(&*file.0.to_string_lossy()), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes_and_nothing_is_loaded() {
    let file = TempFile::new("shape");
    let mut other = ParamStore::new();
    for (_, name, t) in model().iter() {
        if name == "conv.weight" {
            other.add(name, randn(&[2, 3, 5, 5], 30));
        } else {
            other.add(name, t.clone());
        }
    }
    save_params(&other, &file.0).unwrap();
    let err = load_fails(&model(), &file.0);
    match &err {
        TensorFileError::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "conv.weight");
            assert_eq!(expected, &[2, 3, 3, 3]);
            assert_eq!(found, &[2, 3, 5, 5]);
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("\"conv.weight\""), "{msg}");
    assert!(
        msg.contains("[2, 3, 5, 5]") && msg.contains("[2, 3, 3, 3]"),
        "{msg}"
    );

    // A rank change is a shape mismatch too (same element count).
    let mut flat = ParamStore::new();
    for (_, name, t) in model().iter() {
        flat.add(name, t.reshape(&[t.numel()]));
    }
    save_params(&flat, &file.0).unwrap();
    let err = load_fails(&model(), &file.0);
    assert!(matches!(err, TensorFileError::Shape { .. }), "{err:?}");
}

#[test]
fn garbage_bytes_are_a_format_error() {
    let file = TempFile::new("garbage");
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    std::fs::write(&file.0, &garbage).unwrap();
    let err = load_fails(&model(), &file.0);
    assert!(matches!(err, TensorFileError::Format { .. }), "{err:?}");
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );

    // A plausible header length followed by text that is not JSON.
    let mut bad_json = 16u64.to_le_bytes().to_vec();
    bad_json.extend_from_slice(b"{not json at all");
    std::fs::write(&file.0, &bad_json).unwrap();
    let err = load_fails(&model(), &file.0);
    assert!(matches!(err, TensorFileError::Format { .. }), "{err:?}");

    // An empty file.
    std::fs::write(&file.0, b"").unwrap();
    let err = load_fails(&model(), &file.0);
    assert!(matches!(err, TensorFileError::Format { .. }), "{err:?}");
}

#[test]
fn truncated_file_is_a_format_error() {
    let file = TempFile::new("truncated");
    save_params(&model(), &file.0).unwrap();
    let bytes = std::fs::read(&file.0).unwrap();
    // Cut in the data, and cut in the header.
    for keep in [bytes.len() - 4, bytes.len() / 2, 20] {
        std::fs::write(&file.0, &bytes[..keep]).unwrap();
        let err = load_fails(&model(), &file.0);
        assert!(
            matches!(err, TensorFileError::Format { .. }),
            "kept {keep} of {} bytes: {err:?}",
            bytes.len()
        );
        assert!(
            err.to_string().contains(&*file.0.to_string_lossy()),
            "{err}"
        );
    }
}

#[test]
fn other_dtype_is_named() {
    let file = TempFile::new("dtype");
    let bytes: Vec<u8> = [1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2], &bytes).unwrap();
    let data = safetensors::serialize(vec![("conv.bias", view)], None).unwrap();
    std::fs::write(&file.0, data).unwrap();
    let err = load_fails(&model(), &file.0);
    match &err {
        TensorFileError::Dtype { name, found, .. } => {
            assert_eq!(name, "conv.bias");
            assert!(found.contains("I32"), "{found}");
        }
        other => panic!("expected Dtype, got {other:?}"),
    }
    assert!(err.to_string().contains("\"conv.bias\""), "{err}");
}

/// `f64` tensors read (optimizer statistics are stored so), but a parameter stored as `f64`
/// is named as of the wrong type, not as missing.
#[test]
fn f64_tensors_read_and_an_f64_parameter_is_named() {
    let file = TempFile::new("dtype64");
    let m = model();
    let first = m
        .iter()
        .next()
        .map(|(_, n, t)| (n.to_string(), t.shape().to_vec()))
        .unwrap();
    let n: usize = first.1.iter().product();
    let bytes: Vec<u8> = (0..n)
        .flat_map(|i| (i as f64 * 0.5).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, first.1.clone(), &bytes)
            .unwrap();
    let data = safetensors::serialize(vec![(first.0.as_str(), view)], None).unwrap();
    std::fs::write(&file.0, data).unwrap();
    let read = read_tensors(&file.0).unwrap();
    let (shape, values) = &read.tensors64[&first.0];
    assert_eq!(shape, &first.1);
    assert_eq!(values[3], 1.5);
    match load_fails(&m, &file.0) {
        TensorFileError::Dtype { name, found, .. } => {
            assert_eq!(name, first.0);
            assert_eq!(found, "F64");
        }
        other => panic!("expected Dtype, got {other:?}"),
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let file = TempFile::new("absent");
    let err = load_fails(&model(), &file.0);
    match &err {
        TensorFileError::Io { path, source } => {
            assert_eq!(path, &file.0);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some());

    // Writing into a directory that does not exist fails cleanly too.
    let nowhere = std::env::temp_dir()
        .join(format!("kron-no-such-dir-{}", std::process::id()))
        .join("x.safetensors");
    let err = save_params(&model(), &nowhere).unwrap_err();
    assert!(matches!(err, TensorFileError::Io { .. }), "{err:?}");
}

/// Plain files whose names start with `prefix` in the system's temporary directory.
fn leftovers(prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect()
}

/// A symbolic link planted where the temporary file used to be created (`.NAME.tmp<pid>`)
/// or at the target itself is never followed: the victim behind it is untouched and the
/// target becomes a plain file.
#[cfg(unix)]
#[test]
fn an_atomic_write_follows_no_planted_symlink() {
    use kron_autodiff::io::write_atomic;
    let dir = std::env::temp_dir().join(format!("kron-symlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let target = dir.join("weights.safetensors");
    let old_tmp = dir.join(format!(".weights.safetensors.tmp{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
    write_atomic(&target, b"new contents").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
    assert_eq!(std::fs::read(&target).unwrap(), b"new contents");
    // A link at the target itself is replaced by the file, not written through.
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    write_atomic(&link, b"through?").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replaced file keeps its permission bits (a 0600 checkpoint stays 0600).
#[cfg(unix)]
#[test]
fn an_atomic_write_keeps_the_replaced_files_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let f = TempFile::new("perm");
    std::fs::write(&f.0, b"old").unwrap();
    std::fs::set_permissions(&f.0, std::fs::Permissions::from_mode(0o600)).unwrap();
    kron_autodiff::io::write_atomic(&f.0, b"new").unwrap();
    let mode = std::fs::metadata(&f.0).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(std::fs::read(&f.0).unwrap(), b"new");
}

/// A write that fails at the rename (the target is a directory) reports the path, leaves the
/// directory as it was and removes its temporary file.
#[test]
fn a_failed_atomic_write_leaves_no_temporary_file() {
    let dir = std::env::temp_dir().join(format!("kron-failed-write-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("inner")).unwrap();
    let e = kron_autodiff::io::write_atomic(&dir, b"data").unwrap_err();
    assert!(e.to_string().contains("kron-failed-write"), "{e}");
    assert!(dir.join("inner").is_dir());
    let prefix = format!(".kron-failed-write-{}", std::process::id());
    assert_eq!(leftovers(&prefix), Vec::<PathBuf>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tensor or a store read through serde is checked: data that does not fill the shape, a
/// shape whose element count overflows, names that do not match the values one for one, or a
/// name used twice are errors, never a value that panics later. Valid ones round-trip.
#[test]
fn crafted_serde_tensors_and_stores_are_refused() {
    let t = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let json = serde_json::to_string(&t).unwrap();
    assert_eq!(serde_json::from_str::<Tensor>(&json).unwrap(), t);
    for bad in [
        r#"{"shape":[2,3],"data":[1.0,2.0]}"#,
        r#"{"shape":[4294967296,4294967296,4294967296],"data":[]}"#,
        r#"{"shape":[0],"data":[1.0]}"#,
    ] {
        let e = serde_json::from_str::<Tensor>(bad).unwrap_err().to_string();
        assert!(e.contains("elements"), "{bad}: {e}");
    }
    let store = model();
    let json = serde_json::to_string(&store).unwrap();
    assert_eq!(serde_json::from_str::<ParamStore>(&json).unwrap(), store);
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["names"].as_array_mut().unwrap().pop();
    let e = serde_json::from_value::<ParamStore>(v.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("names"), "{e}");
    let first = v["names"][0].clone();
    v["names"].as_array_mut().unwrap().push(first);
    let e = serde_json::from_value::<ParamStore>(v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("twice"), "{e}");
}
