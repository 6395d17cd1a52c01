//! Loading by name from a local HF cache laid out as huggingface_hub writes it.

use std::os::unix::fs::symlink;
use std::path::Path;

use candle_core::{Device, Tensor};
use nanomoe::{AutoModelForCausalLM, GPTConfig, GPT};

/// Moves a saved model into `cache` as repo `repo_id` at commit `sha`: blobs named by
/// content, snapshot entries as relative symlinks, refs/main holding the sha.
fn lay_into_cache(model: &Path, cache: &Path, repo_id: &str, sha: &str) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    let snap = repo.join("snapshots").join(sha);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    for (i, e) in std::fs::read_dir(model).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = format!("blob{i:04}");
        std::fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
        symlink(format!("../../blobs/{blob}"), snap.join(e.file_name())).unwrap();
    }
}

#[test]
fn gpt2_and_repo_ids_load_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = GPTConfig { block_size: 16, vocab_size: 30, n_layer: 1, n_head: 2, n_embd: 8, ..Default::default() };
    let m = GPT::new_seeded(&cfg, 4, &Device::Cpu).unwrap();
    let saved = tmp.path().join("saved");
    m.save_pretrained(&saved).unwrap();
    let cache = tmp.path().join("hub");
    lay_into_cache(&saved, &cache, "openai-community/gpt2", "0123456789abcdef0123456789abcdef01234567");
    lay_into_cache(&saved, &cache, "someone/tiny", "fedcba9876543210fedcba9876543210fedcba98");
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let x = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let want = m.forward(&x, None).unwrap().logits;
    for loaded in [GPT::from_pretrained_gpt2("gpt2").unwrap(), AutoModelForCausalLM::from_pretrained("someone/tiny").unwrap()] {
        let got = loaded.forward(&x, None).unwrap().logits;
        assert_eq!((got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
    let e = GPT::from_pretrained_gpt2("gpt2-xl").err().unwrap().to_string();
    assert_eq!(e, format!("HF_HUB_OFFLINE is set and the snapshot of openai-community/gpt2-xl at main is not in the cache ({})", cache.join("models--openai-community--gpt2-xl").display()));
    let e = AutoModelForCausalLM::from_pretrained("someone/missing").err().unwrap().to_string();
    assert_eq!(e, format!("HF_HUB_OFFLINE is set and the snapshot of someone/missing at main is not in the cache ({})", cache.join("models--someone--missing").display()));
}
