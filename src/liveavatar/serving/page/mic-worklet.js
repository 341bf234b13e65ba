// The microphone as 16 kHz mono signed 16-bit PCM, posted to the page in chunks of `chunk` samples.
// The page asks for a 16 kHz AudioContext, so normally nothing is resampled; where the browser refuses one, the
// context's own rate is brought to 16 kHz by linear interpolation (no anti-alias filter: a fallback only).
class PCM16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.step = sampleRate / (o.targetRate || 16000);  // input samples per output sample
    this.chunk = o.chunk || 640;
    this.out = new Int16Array(this.chunk);
    this.n = 0;
    this.t = 0;      // read position of the next output sample, relative to the current input block
    this.prev = 0;   // the previous block's last sample (for t in [-1, 0))
  }

  push(x) {
    const s = Math.max(-1, Math.min(1, x));
    this.out[this.n++] = s < 0 ? s * 32768 : s * 32767;
    if (this.n === this.chunk) {
      this.port.postMessage(this.out.buffer, [this.out.buffer]);
      this.out = new Int16Array(this.chunk);
      this.n = 0;
    }
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || !channels.length) return true;
    const x = channels[0];
    if (this.step === 1) {
      for (let i = 0; i < x.length; i++) this.push(x[i]);
      return true;
    }
    let t = this.t;
    for (; t <= x.length - 1; t += this.step) {
      const i = Math.floor(t);
      const a = i < 0 ? this.prev : x[i];
      const b = i + 1 < x.length ? x[i + 1] : a;
      this.push(a + (b - a) * (t - i));
    }
    this.t = t - x.length;
    this.prev = x[x.length - 1];
    return true;
  }
}

registerProcessor("pcm16-capture", PCM16Capture);
